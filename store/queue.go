package store

import "fmt"

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
