package store

import "time"

// RelayState is the state of one outbound recipient.
type RelayState string

// Relay states: queued -> sending -> sent | failed | queued.
const (
	RelayQueued  RelayState = "queued"
	RelaySending RelayState = "sending"
	RelaySent    RelayState = "sent"
	RelayFailed  RelayState = "failed"
)

// NewRelay is one RFC 5322 message to relay to Internet recipients.
type NewRelay struct {
	From        string // envelope sender; "" = null sender (DSNs)
	Message     []byte
	Recipients  []RelayRecipient
	NextAttempt time.Time
	Expires     time.Time
}

// RelayRecipient is one envelope recipient of a relay.
type RelayRecipient struct {
	ID        int64 // assigned by the store
	Addr      string
	Report    Report
	State     RelayState
	Attempts  int
	Expires   time.Time
	LastError string
}

// RelayBatch is the due recipients of one relay message.
type RelayBatch struct {
	MessageRef int64
	From       string
	Message    []byte
	Recipients []RelayRecipient
}

// RelayResult ends one recipient of a claimed (sending) or expired (queued)
// relay.
type RelayResult struct {
	ID          int64
	From        RelayState // expected current state
	State       RelayState // queued, sent or failed
	NextAttempt time.Time
	Error       string
	Requeue     bool // for queued: undo the claim's attempt count
}
