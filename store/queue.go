package store

import (
	"fmt"
	"time"
)

// QueueKind names one of the two queues an operator looks at.
type QueueKind string

// Queue kinds.
const (
	QueueDelivery QueueKind = "delivery" // a message for a device
	QueueRelay    QueueKind = "relay"    // one Internet recipient of a message for the smarthost
)

// QueueRef names one queue entry. Ids are unique within a kind only.
type QueueRef struct {
	Kind QueueKind
	ID   int64
}

// DefaultQueueLimit is ListQueue's limit when the filter sets none.
const DefaultQueueLimit = 1000

// QueueFilter selects the entries ListQueue lists.
type QueueFilter struct {
	Kind QueueKind // "" = both queues
	// States lists the states wanted, as stored (DeliveryState and
	// RelayState values, matched in both queues); empty = every state.
	States []string
	Device uint32 // non-zero: deliveries to this device only (no relays)
	Limit  int    // at most this many entries; 0 = DefaultQueueLimit
}

// QueueEntry is one delivery or relay recipient as an operator sees it.
type QueueEntry struct {
	Ref            QueueRef
	State          string  // a DeliveryState or a RelayState
	Device         uint32  // delivery: the device delivered to
	Recipient      string  // relay: the Internet recipient
	From           string  // relay: the envelope sender ("" = null sender)
	MessageRef     int64   // relay: the message, shared by its recipients
	MessageID      string  // delivery: the id it carries; relay: Report.MessageID ("" for a DSN)
	ContentType    uint32  // delivery
	Priority       uint8   // delivery
	SubmissionTime *uint32 // delivery
	Size           int     // octets of the content (delivery) or the message (relay)
	Attempts       int
	NextAttempt    time.Time // meaningful while queued
	Expires        time.Time
	Created        time.Time // queued at
	Updated        time.Time
	LastError      string
	// Owner is the node id of the server that has the entry in flight
	// (PostgreSQL; 0 = none, and always 0 with SQLite).
	Owner int32
	// Report and Content are filled in by QueueEntry only: ListQueue
	// leaves them empty.
	Report  Report
	Content []byte // the content (delivery) or the RFC 5322 message (relay)
}

// QueueList is ListQueue's answer.
type QueueList struct {
	// Entries are the first entries matching, oldest first (queueing
	// time, then kind and id), at most the filter's limit.
	Entries []QueueEntry
	// Counts are all entries matching, limit or not, by kind and state.
	Counts map[QueueKind]map[string]int
}

// Matched is the number of entries matching the filter.
func (l QueueList) Matched() int {
	n := 0
	for _, byState := range l.Counts {
		for _, c := range byState {
			n += c
		}
	}
	return n
}

// Truncated reports whether the limit left matching entries out.
func (l QueueList) Truncated() bool { return l.Matched() > len(l.Entries) }

// QueueSelect chooses the entries RetryQueued acts on: the entries of
// Refs, or every entry (All), or every delivery to Device.
type QueueSelect struct {
	Refs   []QueueRef
	All    bool
	Device uint32
	// Kind, with All, keeps to one queue ("" = both): SIGHUP re-attempts
	// the deferred relays only.
	Kind QueueKind
	// Force also takes the selected entries that are in flight back into
	// the queue, whoever holds them: for an operator who knows the server
	// holding them will never finish them, and for a server that finds
	// its own entries in flight with no worker on them. The holder's
	// outcome, should it come after all, is then refused (ErrConflict),
	// and the entry is attempted again: a device or smarthost may get it
	// twice.
	Force bool
}

// QueueChange says what RetryQueued or RemoveQueued did.
type QueueChange struct {
	Changed  int // queued entries made due, or removed
	InFlight int // entries selected but in flight: left alone
	Forced   int // in-flight entries taken back (Force; counted in Changed too)
	// Skipped are the Refs given that were left alone, with their state
	// (in flight or finished); State "" = no such entry.
	Skipped []QueueSkip
}

// QueueSkip is one entry named but left alone.
type QueueSkip struct {
	Ref   QueueRef
	State string
}

// The checks every backend makes on the arguments of the operator's queue
// methods (ListQueue, RetryQueued, RemoveQueued), so that all refuse the
// same values with ErrInvalid.

// CheckQueueFilter validates f.
func CheckQueueFilter(f QueueFilter) error {
	if f.Kind != "" && f.Kind != QueueDelivery && f.Kind != QueueRelay {
		return fmt.Errorf("%w: queue kind %q", ErrInvalid, f.Kind)
	}
	if f.Device != 0 && f.Kind == QueueRelay {
		return fmt.Errorf("%w: a device selects deliveries, not relays", ErrInvalid)
	}
	if f.Limit < 0 {
		return fmt.Errorf("%w: queue list limit %d", ErrInvalid, f.Limit)
	}
	return nil
}

// QueueLimit is f's limit, DefaultQueueLimit when unset.
func QueueLimit(f QueueFilter) int {
	if f.Limit == 0 {
		return DefaultQueueLimit
	}
	return f.Limit
}

// CheckQueueRefs validates refs (known kinds, positive ids) and returns
// them without repeats, in their order, so that an entry named twice is
// acted on and reported once.
func CheckQueueRefs(refs []QueueRef) ([]QueueRef, error) {
	seen := make(map[QueueRef]bool, len(refs))
	out := make([]QueueRef, 0, len(refs))
	for _, r := range refs {
		if (r.Kind != QueueDelivery && r.Kind != QueueRelay) || r.ID <= 0 {
			return nil, fmt.Errorf("%w: queue entry %q %d", ErrInvalid, r.Kind, r.ID)
		}
		if !seen[r] {
			seen[r] = true
			out = append(out, r)
		}
	}
	return out, nil
}

// CheckQueueSelect validates sel (exactly one of Refs, All and Device)
// and returns it with its refs checked as CheckQueueRefs does.
func CheckQueueSelect(sel QueueSelect) (QueueSelect, error) {
	n := 0
	for _, set := range []bool{len(sel.Refs) > 0, sel.All, sel.Device != 0} {
		if set {
			n++
		}
	}
	if n != 1 {
		return sel, fmt.Errorf("%w: select queue entries by refs, all or device (one of them)", ErrInvalid)
	}
	if sel.Kind != "" && (!sel.All || (sel.Kind != QueueDelivery && sel.Kind != QueueRelay)) {
		return sel, fmt.Errorf("%w: queue kind %q with all = %v", ErrInvalid, sel.Kind, sel.All)
	}
	var err error
	sel.Refs, err = CheckQueueRefs(sel.Refs)
	return sel, err
}

// InFlightState is the state of an entry of kind k that a server has
// claimed: DeliveryInFlight or RelaySending.
func InFlightState(k QueueKind) string {
	if k == QueueRelay {
		return string(RelaySending)
	}
	return string(DeliveryInFlight)
}
