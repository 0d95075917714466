package store

import "time"

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
	// Contact is the device's contact (Device.Contact), read with the
	// delivery by ClaimDelivery and PeekDelivery, so that an attempt needs
	// no read of its own to choose where to send (zero: never heard, or
	// not readable; DeviceContact says why). Zero elsewhere.
	Contact Contact
}

// DeviceDue is a device with queued deliveries and the earliest next
// attempt among those QueuedDevices looked at.
type DeviceDue struct {
	Device uint32
	Next   time.Time
	// Heard is when the device was last heard from (its contact's time;
	// zero: never): a scheduler that starts knowing nothing else of the
	// devices may try those with a recent sign of life first.
	Heard time.Time
}

// DeliveryInfo summarises one queued delivery for delivery control.
type DeliveryInfo struct {
	ContentType uint32
	Length      int
	Priority    uint8
}

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
