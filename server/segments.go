package server

import (
	"net/netip"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
)

// segKey identifies one submission INVOKE independently of its ESRO
// reference: a device that re-invokes a segment after an ESRO failure uses
// the same socket, instance id and octets (§1.5 Recommend).
type segKey struct {
	from submitter
	id   uint8
	sum  [32]byte
}

// submitter keys the reassembly of segmented submissions: a device's
// address and the socket it sends from. Two programs of one device (two
// runs of emsdp ua send, which both start their sequence ids afresh) then
// never have their segments joined; a device whose address changes in the
// middle of a message has it refused and sends it again.
type submitter struct {
	dev  emsd.Address
	peer netip.AddrPort
}

type segEntry struct {
	answer []byte
	sub    *store.Submission // set for the segment that completed a message
	ipm    *emsd.IPM         // sub's message, decoded
	// full is a message the segment completed but that could not be
	// committed: a re-invocation of the segment retries the commit
	// instead of failing on the reassembler's forgotten sequence.
	full *emsd.SubmitArgument
	at   time.Time
}

// segCache remembers the answers to recent segment INVOKEs so that a
// re-invoked segment gets the same answer instead of a duplicate-segment
// error from the reassembler. An entry is forgotten as soon as the device
// acknowledges its answer: the device then knows the segment arrived and
// will not re-invoke it, so a later identical segment is a new message (a
// reference UA restarts its instance ids and sequence ids at every start,
// docs/protocol.md EMSD §1.5, §8). Bounded in size and age.
type segCache struct {
	mu    sync.Mutex
	m     map[segKey]*segEntry
	order []segKey
	ttl   time.Duration
	max   int
}

func (c *segCache) get(k segKey, now time.Time) *segEntry {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.m[k]
	if e == nil || now.Sub(e.at) > c.ttl {
		return nil
	}
	return e
}

func (c *segCache) del(k segKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, k) // its place in order goes when it reaches the front
}

func (c *segCache) put(k segKey, e *segEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[segKey]*segEntry{}
	}
	if _, ok := c.m[k]; !ok {
		c.order = append(c.order, k)
	}
	c.m[k] = e
	for len(c.order) > c.max || (len(c.order) > 0 && c.m[c.order[0]] == nil) {
		delete(c.m, c.order[0])
		c.order = c.order[1:]
	}
}

// activeSubs tracks the submissions whose RESULT handlers still wait for
// the device's confirmation: how many handlers wait (a submission
// re-invoked while the first handler still waits must not be dropped by
// the first one's verify), the socket the submission came from, and
// whether a confirmation has arrived (before the store has heard of it).
type activeSubs struct {
	mu sync.Mutex
	m  map[int64]*activeSub
	// gone lists resolved submissions, oldest first: they stay known (as
	// not re-invocable) for resolvedGrace, since a concurrent INVOKE may
	// have read the store before the resolution was committed.
	gone []goneSub
	// devices serialises, per device (striped), finding a submission's
	// earlier copy and registering a new one, so that of two concurrent
	// submissions the second sees the first with its socket.
	devices [64]sync.Mutex
}

// lockDevice locks addr's stripe of devices and returns the unlock.
func (a *activeSubs) lockDevice(addr uint32) func() {
	m := &a.devices[addr%uint32(len(a.devices))]
	m.Lock()
	return m.Unlock
}

type activeSub struct {
	waiters   int
	peer      netip.AddrPort
	confirmed bool
	resolved  bool
}

type goneSub struct {
	id int64
	at time.Time
}

// resolvedGrace is how long a resolved submission stays known: far longer
// than one store read.
const resolvedGrace = 30 * time.Second

// wait registers a handler waiting for the confirmation of submission id
// from peer.
func (a *activeSubs) wait(id int64, peer netip.AddrPort) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[int64]*activeSub{}
	}
	e := a.m[id]
	if e == nil {
		e = &activeSub{peer: peer}
		a.m[id] = e
	}
	e.waiters++
}

// done ends a wait and returns how many handlers still wait. The
// submission stays known until resolved is called.
func (a *activeSubs) done(id int64, confirmed bool) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.m[id]
	if e == nil {
		return 0
	}
	e.waiters--
	e.confirmed = e.confirmed || confirmed
	return max(e.waiters, 0)
}

// resolved marks a submission released or dropped (or left for the next
// start): no later INVOKE is its re-invocation. Unless another handler
// still waits for it, it is forgotten after resolvedGrace.
func (a *activeSubs) resolved(id int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := time.Now()
	for len(a.gone) > 0 && now.Sub(a.gone[0].at) > resolvedGrace {
		if e := a.m[a.gone[0].id]; e != nil && e.resolved && e.waiters <= 0 {
			delete(a.m, a.gone[0].id)
		}
		a.gone = a.gone[1:]
	}
	if e := a.m[id]; e != nil && e.waiters <= 0 {
		e.resolved = true
		a.gone = append(a.gone, goneSub{id, now})
	}
}

// waiting returns how many handlers wait for submission id.
func (a *activeSubs) waiting(id int64) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if e := a.m[id]; e != nil {
		return e.waiters
	}
	return 0
}

// mayReinvoke reports whether an INVOKE from peer can be a re-invocation
// of submission id as far as this process knows: a re-invocation comes
// from the socket of the first one (§1.5), and not after the device
// confirmed the RESULT. Unknown here (another process, or before a
// restart): true, and the stored state decides.
func (a *activeSubs) mayReinvoke(id int64, peer netip.AddrPort) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.m[id]
	return e == nil || (!e.confirmed && !e.resolved && e.peer == peer)
}
