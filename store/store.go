// Package store is the durable state of the EMSD server: the device
// registry, submissions, the per-device delivery queue, the outbound relay
// queue, delivery statuses and the message-id counters. Store is the
// interface the server uses; store/sqlite is the embedded implementation.
//
// The package knows nothing of EMSD encodings: addresses are subscriber
// numbers, message ids are opaque strings chosen by the server, contents
// are octets. Every method that writes does so in one transaction, so a
// caller that got nil back knows the change is on disk (docs/protocol.md EMSD §9.5:
// commit before RESULT).
//
// Backends must not depend on engine-specific semantics beyond what these
// methods promise; storetest holds the conformance tests every backend
// runs.
package store

import (
	"context"
	"errors"
	"net/netip"
	"time"
)

// Errors returned by Store methods; match with errors.Is.
var (
	ErrNotFound = errors.New("store: not found")
	ErrExists   = errors.New("store: already exists")
	// ErrConflict: the row is no longer in the state the caller expected
	// (another actor finished it first).
	ErrConflict = errors.New("store: state conflict")
	// ErrBusy: the device already has a delivery in flight (one at a time,
	// docs/protocol.md EMSD §9.9).
	ErrBusy = errors.New("store: device has a delivery in flight")
	// ErrInvalid: a value the store refuses (e.g. device address 0).
	ErrInvalid = errors.New("store: invalid value")
)

// Mode is a device's delivery mode (docs/protocol.md EMSD §9.2).
type Mode string

// Delivery modes.
const (
	ModeComplete  Mode = "complete"  // 3-way deliveries, SAP 2 -> 3
	ModeEfficient Mode = "efficient" // 2-way deliveries, SAP 6 -> 7
)

// Device is one registry entry.
type Device struct {
	Address      uint32 // EMSD address (subscriber number), never 0
	PasswordHash string // HashPassword output; "" = no password
	// IP and Port are the registered network address: where a device
	// without password is identified from, and where deliveries go while
	// no fresh Contact is known. IP is optional for a device with a
	// password (the zero netip.Addr, Port 0): it is reached only at the
	// address it is heard from; and for a device with a DTLS key: it is
	// reached through the sessions it opens.
	IP      netip.Addr
	Port    uint16
	Version string   // "1.1" or "1.0"
	Mode    Mode     // delivery mode
	Aliases []string // lower-case mail addresses, unique over all devices
	Control DeliveryControl
	// PSK is the device's DTLS pre-shared key (its identity is its EMSD
	// address); nil = none. A secret: kept beside the password hash, and
	// never logged or shown after it is set.
	PSK []byte
	// RequireDTLS refuses the device's operations over plain UDP.
	RequireDTLS bool
	// Contact is where the device was last heard from (SetContact); it
	// is not part of the registry: UpdateDevice keeps it, and changing it
	// does not change RegistryVersion.
	Contact Contact
	Created time.Time
	Updated time.Time
}

// Contact is the address a device was last heard from in authenticated
// traffic: behind a NAT or on a changing lease, the only address at which
// datagrams reach it (RFC 4787: a NAT lets in only what comes over the
// binding the device opened, from the address the device sent to).
type Contact struct {
	Addr netip.AddrPort // the source address and port; invalid = never heard
	// Via names the server endpoint that heard it (Server.Via): a NAT
	// with address-dependent filtering passes deliveries from there only.
	Via string
	At  time.Time // when it was last heard (milliseconds)
	// Polled: heard in a delivery control (a poll), the operation a
	// device sends from where it receives; else in a submission, which a
	// device may send from a passing socket.
	Polled bool
}

// Known reports whether c holds an address.
func (c Contact) Known() bool { return c.Addr.IsValid() }

// DeliveryControl holds the limits a device set with delivery control
// (docs/protocol.md EMSD §9.12); nil fields are unrestricted.
type DeliveryControl struct {
	Operations       *uint64 // permissible-operations, bit i = operation value i
	MaxContentLength *uint32
	LowestPriority   *uint8 // 0 non-urgent, 1 normal, 2 urgent
}

// ImportResult is what ImportDevices did with one device: Err nil means
// written (added, or replaced when Updated).
type ImportResult struct {
	Updated bool
	Err     error
}

// SubmissionState is the life cycle of a submission (docs/protocol.md EMSD §9.5):
// pending from commit until the RESULT is confirmed (or verified), then
// released (its deliveries and relays exist) or dropped.
type SubmissionState string

// Submission states.
const (
	SubmissionPending  SubmissionState = "pending"
	SubmissionReleased SubmissionState = "released"
	SubmissionDropped  SubmissionState = "dropped"
)

// Submission is a message submitted by a device.
type Submission struct {
	ID          int64 // assigned by AddSubmission
	Device      uint32
	InstanceID  uint8
	ContentHash []byte // dedupe key with Device and InstanceID
	ContentType uint32
	Content     []byte
	Received    time.Time
	// LocalTime and Number form the local message id (docs/protocol.md EMSD §6.3),
	// assigned by AddSubmission: LocalTime is Received in seconds, Number
	// comes from a persistent counter, so the pair never repeats.
	LocalTime uint32
	Number    uint32
	State     SubmissionState
	Verify    string // how a pending submission was resolved: "confirmed", "send", "drop", "failure", "restart"
}

// Report says what to report about a delivery or relay and to whom. The
// server builds the reports; the store only keeps these values.
type Report struct {
	Device    uint32 // EMSD originator to send an EMSD report to; 0 = none
	Mail      string // Internet sender to send a DSN to; "" = none
	Flags     uint8  // per-recipient flags of the recipient (bits 5, 6 ask for reports)
	Recipient string // the recipient as the reported message names it
	MessageID string // id of the reported message, as the originator knows it
	Headers   []byte // original header section, for a DSN
	// DSN holds the Internet sender's RFC 3461 parameters for this
	// recipient (NOTIFY, ORCPT, ENVID, RET) in the server's encoding;
	// "" = none given.
	DSN string
}

// DeliveryState is the state of a queued delivery to a device.
type DeliveryState string

// Delivery states. Queued -> in-flight -> delivered | failed | queued
// (respooled); queued -> failed (expired).
const (
	DeliveryQueued    DeliveryState = "queued"
	DeliveryInFlight  DeliveryState = "inflight"
	DeliveryDelivered DeliveryState = "delivered"
	DeliveryFailed    DeliveryState = "failed"
)

// NewDelivery is a message to queue for one device.
type NewDelivery struct {
	Device         uint32
	MessageID      string  // exact id the DeliverArgument will carry (server's encoding)
	SubmissionTime *uint32 // EMSD time for the [0] field; nil = absent
	ContentType    uint32
	Content        []byte // encoded in protocol 1.1
	Priority       uint8  // 0 non-urgent, 1 normal, 2 urgent
	NextAttempt    time.Time
	Expires        time.Time
	Report         Report
}

// Delivery is a queued delivery as stored.
type Delivery struct {
	NewDelivery
	ID       int64
	State    DeliveryState
	Attempts int // attempts started (claims)
	// InstanceBase is the first instance id the claim reserved
	// (Limits.InstanceIDs).
	InstanceBase uint8
	Created      time.Time
	Updated      time.Time
	LastError    string
}

// DeviceDue is a device with queued deliveries and the earliest next
// attempt among those QueuedDevices looked at.
type DeviceDue struct {
	Device uint32
	Next   time.Time
}

// DeliveryInfo summarises one queued delivery for delivery control.
type DeliveryInfo struct {
	ContentType uint32
	Length      int
	Priority    uint8
}

// RegistryLogVersions is how many registry versions RegistryChanges can
// look back over. A server further behind reads the whole registry.
const RegistryLogVersions = 4096

// Limits restrict which deliveries ClaimDelivery may take, and say what
// else its claim reserves.
type Limits struct {
	MaxContentLength *uint32
	LowestPriority   *uint8
	// InstanceIDs, when set, tells how many instance ids (0 to 256) the
	// claimed delivery needs towards its device; the claim reserves them
	// in its own transaction, as ReserveInstanceIDs does, and returns the
	// first in Delivery.InstanceBase, so that an attempt costs one write
	// instead of two. It runs inside the transaction (possibly more than
	// once, when the transaction is retried): it must be quick and must
	// not use the store.
	InstanceIDs func(*Delivery) int
}

// DeliveryResult ends an in-flight (or expires a queued) delivery.
type DeliveryResult struct {
	State       DeliveryState // queued (respool), delivered or failed
	NextAttempt time.Time     // for queued
	Error       string
	// Status, when non-zero, is recorded for delivery verify under the
	// delivery's device and message id (docs/protocol.md EMSD §9.13).
	Status uint8
	// Requeue, for State queued: undo the claim's attempt count (the
	// attempt never reached the device, e.g. on shutdown).
	Requeue bool
	// Attempted, finishing from queued: the delivery was attempted
	// without a claim (PeekDelivery); the attempt is counted, and the
	// device's instance id counter advances by InstanceIDs, in this write.
	Attempted   bool
	InstanceIDs int
	Work        Work // reports and the like, created in the same transaction
}

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

// Work is new queue entries written atomically with another change.
type Work struct {
	Deliveries []NewDelivery
	Relays     []NewRelay
}

// Empty reports whether w holds nothing.
func (w Work) Empty() bool { return len(w.Deliveries) == 0 && len(w.Relays) == 0 }

// Stats are queue sizes by state.
type Stats struct {
	Devices            int
	SubmissionsPending int
	Deliveries         map[DeliveryState]int
	Relays             map[RelayState]int
}

// Recovered counts what Recover put back.
type Recovered struct {
	Deliveries int // in-flight deliveries re-queued
	Relays     int // sending relays re-queued
}

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

// Store is the durable state of the server. All methods are safe for
// concurrent use, also by several processes on one database (the device
// commands edit the registry while the server runs).
type Store interface {
	// AddDevice adds d (ErrExists when the address or an alias is taken).
	AddDevice(ctx context.Context, d *Device) error
	// UpdateDevice replaces d's registry fields (password hash, network
	// address, version, mode, aliases) but not its delivery control.
	UpdateDevice(ctx context.Context, d *Device) error
	// ImportDevices writes a batch of devices in one transaction, each
	// whole or not at all: a device whose address exists is replaced as
	// UpdateDevice does when update is set, else refused with ErrExists;
	// one with an alias another device has is refused with ErrExists, an
	// invalid one with ErrInvalid. The results are in the order of devs;
	// err is a failure of the whole batch (then nothing is written).
	ImportDevices(ctx context.Context, devs []*Device, update bool) (results []ImportResult, err error)
	// RemoveDevice deletes a device and its aliases.
	RemoveDevice(ctx context.Context, addr uint32) error
	Device(ctx context.Context, addr uint32) (*Device, error)
	// Devices lists the registry in address order.
	Devices(ctx context.Context) ([]*Device, error)
	// SetDeliveryControl replaces a device's delivery-control limits. It
	// changes RegistryVersion, so that every server sharing the store
	// applies the new limits.
	SetDeliveryControl(ctx context.Context, addr uint32, c DeliveryControl) error
	// RegistryVersion changes whenever the registry does, so that a
	// running server notices edits made by another process.
	RegistryVersion(ctx context.Context) (int64, error)
	// RegistryChanges lists the devices whose registry entry was added,
	// edited or removed in the versions after since, up to version (the
	// current one), in address order, so that a server applies a change
	// in O(changed) instead of reading the whole registry. ok is false
	// when the store no longer holds every change since then (it keeps
	// the last RegistryLogVersions versions): read the whole registry.
	RegistryChanges(ctx context.Context, since int64) (version int64, addrs []uint32, ok bool, err error)
	// SetContact records c as the device's contact unless the stored one
	// is newer (c.At before the stored At: a slower server's write of an
	// older contact loses). It returns the contact stored before and
	// whether c was recorded. It does not change RegistryVersion.
	// ErrNotFound: no such device; ErrInvalid: c.Addr invalid.
	SetContact(ctx context.Context, addr uint32, c Contact) (prev Contact, written bool, err error)
	// TouchContact moves the time of the device's contact forward to at,
	// only if the contact is still c.Addr through c.Via: a sign of life
	// at a known address never moves the address. It reports whether it
	// did.
	TouchContact(ctx context.Context, addr uint32, c Contact, at time.Time) (bool, error)
	// DeviceContact returns a device's contact (zero when never heard;
	// ErrNotFound: no such device).
	DeviceContact(ctx context.Context, addr uint32) (Contact, error)
	// ReserveInstanceIDs reserves n consecutive instance ids (mod 256) for
	// operations towards a device and returns the first. The counter is
	// persistent, so ids keep advancing across restarts (docs/protocol.md EMSD §1.5).
	ReserveInstanceIDs(ctx context.Context, addr uint32, n int) (uint8, error)
	// NextMessageNumber returns a daily message number for a local message
	// id with submission time t; (t in seconds, number) never repeats,
	// across restarts and across servers sharing the store. Numbers may
	// skip.
	NextMessageNumber(ctx context.Context, t time.Time) (uint32, error)

	// AddSubmission commits a submission in state pending and assigns its
	// local message id. If the same device submitted the same instance id
	// and content hash at or after dedupeSince, it returns that submission
	// instead and dup = true.
	AddSubmission(ctx context.Context, s *Submission, dedupeSince time.Time) (rec *Submission, dup bool, err error)
	// ReleaseSubmission moves a pending submission to released and queues
	// w in the same transaction. released is false (and nothing is
	// queued) when it was not pending.
	ReleaseSubmission(ctx context.Context, id int64, verify string, w Work) (released bool, err error)
	// DropSubmission moves a pending submission to dropped.
	DropSubmission(ctx context.Context, id int64, verify string) (dropped bool, err error)
	// PendingSubmissions lists pending submissions received before
	// 'before', oldest first, that this handle or a process that is gone
	// received; never those a live server sharing the store is still
	// confirming.
	PendingSubmissions(ctx context.Context, before time.Time) ([]*Submission, error)

	// Enqueue writes w atomically.
	Enqueue(ctx context.Context, w Work) error

	// WakeDevice makes every queued delivery of the device due at now
	// (docs/protocol.md EMSD §9.4) and returns how many it moved.
	WakeDevice(ctx context.Context, addr uint32, now time.Time) (int, error)
	// QueuedDevices lists the devices with queued deliveries changed
	// (queued, re-queued, woken, retried, recovered) at or after since,
	// each with the earliest next attempt among those deliveries, in
	// device order; the zero since lists every device with queued
	// deliveries. A scheduler rebuilds its due times from it at start
	// (zero since) and finds the changes other processes made with a
	// recent since, which an index keeps O(changed rows).
	QueuedDevices(ctx context.Context, since time.Time) ([]DeviceDue, error)
	// DeviceNextDue is the earliest next attempt of the device's queued
	// deliveries; ok is false when it has none.
	DeviceNextDue(ctx context.Context, addr uint32) (t time.Time, ok bool, err error)
	// NextDue is the earliest next attempt or expiry after 'after' of
	// queued deliveries and relays; ok is false when there is none.
	// (Entries already due are the caller's business: a delivery held back
	// by delivery control must not make a scheduler spin.)
	NextDue(ctx context.Context, after time.Time) (t time.Time, ok bool, err error)
	// ClaimDelivery takes the device's oldest due queued delivery within
	// lim, moves it to in-flight and counts an attempt. ErrNotFound: none;
	// ErrBusy: the device already has one in flight (on any server sharing
	// the store). Only the claiming handle may finish the delivery.
	ClaimDelivery(ctx context.Context, addr uint32, now time.Time, lim Limits) (*Delivery, error)
	// PeekDelivery returns the delivery ClaimDelivery would take without
	// taking it: it stays queued, no attempt is counted, nothing is
	// written; with lim.InstanceIDs, Delivery.InstanceBase is the device's
	// next instance id, not reserved. Its outcome is written by
	// FinishDelivery from queued with DeliveryResult.Attempted, which
	// counts the attempt and reserves the instance ids: one write per
	// attempt instead of two. Only for a store one server uses alone,
	// whose scheduler keeps attempts to a device one at a time: nothing
	// stops another handle from claiming the delivery meanwhile.
	PeekDelivery(ctx context.Context, addr uint32, now time.Time, lim Limits) (*Delivery, error)
	// FinishDelivery moves a delivery from state 'from' as r says, records
	// r.Status and queues r.Work, in one transaction. ErrConflict: the
	// delivery is not in state 'from'.
	FinishDelivery(ctx context.Context, id int64, from DeliveryState, r DeliveryResult) error
	// ExpiredDeliveries lists queued deliveries whose expiry is at or
	// before now.
	ExpiredDeliveries(ctx context.Context, now time.Time, limit int) ([]*Delivery, error)
	// QueuedDeliveries summarises a device's queued deliveries.
	QueuedDeliveries(ctx context.Context, addr uint32) ([]DeliveryInfo, error)
	// DeliveryStatus returns the status recorded for a message id
	// delivered to a device (ErrNotFound: none).
	DeliveryStatus(ctx context.Context, addr uint32, messageID string) (uint8, error)

	// ClaimRelays moves up to limit due queued relay recipients to
	// sending, counts an attempt each and returns them grouped by message.
	ClaimRelays(ctx context.Context, now time.Time, limit int) ([]*RelayBatch, error)
	// FinishRelays applies rs and queues w in one transaction;
	// ErrConflict if any recipient is not in its expected state (then
	// nothing is applied).
	FinishRelays(ctx context.Context, rs []RelayResult, w Work) error
	// ExpiredRelays lists queued relay recipients whose expiry is at or
	// before now, grouped by message.
	ExpiredRelays(ctx context.Context, now time.Time, limit int) ([]*RelayBatch, error)

	// ListQueue lists the entries of the delivery and relay queues that
	// match f, at most f.Limit (0: DefaultQueueLimit; negative is
	// ErrInvalid), without reports and contents, and counts all matches.
	ListQueue(ctx context.Context, f QueueFilter) (QueueList, error)
	// QueueEntry returns one entry with its report and contents
	// (ErrNotFound: none).
	QueueEntry(ctx context.Context, ref QueueRef) (*QueueEntry, error)
	// RetryQueued makes the queued entries of sel due at now: a next
	// attempt after now becomes now; the expiry stays. Entries in flight
	// (a server is delivering or relaying them, on any server sharing the
	// store) and finished ones are left alone, in flight ones unless
	// sel.Force: a retry never resurrects a delivered or failed entry.
	RetryQueued(ctx context.Context, sel QueueSelect, now time.Time) (QueueChange, error)
	// RemoveQueued deletes the queued entries of refs (and the message of
	// a relay whose last recipient goes), silently: no report and no
	// status are made. Entries in flight or finished are left alone and
	// listed in Skipped.
	RemoveQueued(ctx context.Context, refs []QueueRef) (QueueChange, error)

	// Recover re-queues deliveries and relays left in flight by this
	// handle or by processes that are gone (stopped without finishing
	// them); never a live server's work. The server calls it at start,
	// with nothing of its own in flight.
	Recover(ctx context.Context) (Recovered, error)
	// Purge deletes finished deliveries, relays and submissions last
	// changed before 'before', and statuses older than statusBefore.
	Purge(ctx context.Context, before, statusBefore time.Time) (int, error)
	Stats(ctx context.Context) (Stats, error)
	// Ping checks that the store answers.
	Ping(ctx context.Context) error
	Close() error
}
