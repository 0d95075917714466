// Package store is the durable state of the EMSD server: the device
// registry, submissions, the per-device delivery queue, the outbound relay
// queue, delivery statuses and the message-id counters. Store is all of
// it as one handle, made of one small interface per consumer (Registry,
// Submissions, Deliveries, Relays, QueueAdmin...); store/sqlite is the
// embedded implementation, store/postgres the shared one, and store/open
// opens the one a configuration names. The checks and stored encodings
// both backends share live here (device.go, work.go, queue.go, encode.go).
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

// Store is the durable state of the server: every part, as one handle.
// All methods are safe for concurrent use, also by several processes on
// one database (the device commands edit the registry while the server
// runs). A consumer that needs only a part takes that part's interface.
type Store interface {
	Registry
	Counters
	Submissions
	Enqueuer
	Deliveries
	Relays
	QueueAdmin
	Maintenance
	Close() error
}

// Registry is the device registry: the devices, their aliases and
// delivery control, the change log a server follows the registry by, and
// where each device was last heard from. The device commands and the
// server's registry use it.
type Registry interface {
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
}

// Counters are the persistent counters the server draws identifiers
// from, so that they never repeat across restarts or across servers.
type Counters interface {
	// ReserveInstanceIDs reserves n consecutive instance ids (mod 256) for
	// operations towards a device and returns the first. The counter is
	// persistent, so ids keep advancing across restarts (docs/protocol.md EMSD §1.5).
	ReserveInstanceIDs(ctx context.Context, addr uint32, n int) (uint8, error)
	// NextMessageNumber returns a daily message number for a local message
	// id with submission time t; (t in seconds, number) never repeats,
	// across restarts and across servers sharing the store. Numbers may
	// skip.
	NextMessageNumber(ctx context.Context, t time.Time) (uint32, error)
}

// Submissions are the messages devices submit, from the commit before
// the RESULT until they are released into the queues or dropped.
type Submissions interface {
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
}

// Enqueuer queues new work on its own: mail arriving from the Internet.
type Enqueuer interface {
	// Enqueue writes w atomically.
	Enqueue(ctx context.Context, w Work) error
}

// Deliveries is the per-device delivery queue as the delivery scheduler
// and the delivery-control handlers use it.
type Deliveries interface {
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
}

// Relays is the outbound queue of Internet recipients the relay worker
// sends to the smarthost.
type Relays interface {
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
}

// QueueAdmin is the operator's view of both queues (emsdp queue, the
// admin listener): listing, showing, retrying and removing entries.
type QueueAdmin interface {
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
}

// Maintenance is the server's housekeeping: recovery at start, purging
// finished entries, queue statistics and health.
type Maintenance interface {
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
}
