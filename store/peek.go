package store

import (
	"context"
	"time"
)

// Peeked is what a first attempt to a device needs from the store: the
// delivery PeekDelivery would return without limits, its InstanceBase the
// device's next instance id (not reserved), and the device's contact.
type Peeked struct {
	Delivery *Delivery
	Contact  Contact
}

// BatchPeeker is implemented by a store that can read many devices' first
// attempts in one query: a scheduler starting hundreds of attempts to
// devices it knows nothing of (after a start, most of them maybe switched
// off) then pays one read for them instead of two each. Only for a store
// one server uses alone, as PeekDelivery.
type BatchPeeker interface {
	// PeekDeliveries returns, for each of addrs that has a due queued
	// delivery and none in flight, what PeekDelivery and DeviceContact
	// would (an unreadable contact left zero, as PeekDelivery leaves
	// it). A device left out is to be asked alone.
	PeekDeliveries(ctx context.Context, addrs []uint32, now time.Time) (map[uint32]Peeked, error)
}
