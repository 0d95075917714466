package esro

// timerHeap orders the invocations with a running timer by deadline. It is
// the machine's hottest structure under load (every invocation arms and
// disarms it several times and stays in it for the reference hold), so the
// deadlines are kept inline as integers: comparisons touch only the heap's
// own array, not the invocations it points to. The sift rules are those of
// container/heap, so equal deadlines fire in the same order.
type timerHeap []timerEntry

type timerEntry struct {
	at  int64 // deadline in nanoseconds after machine.epoch
	inv *invocation
}

// push adds inv with deadline at.
func (h *timerHeap) push(inv *invocation, at int64) {
	*h = append(*h, timerEntry{at, inv})
	inv.hidx = len(*h) - 1
	h.up(inv.hidx)
}

// fix moves entry i after its deadline changed to at.
func (h timerHeap) fix(i int, at int64) {
	h[i].at = at
	if !h.down(i, len(h)) {
		h.up(i)
	}
}

// remove takes out entry i.
func (h *timerHeap) remove(i int) {
	n := len(*h) - 1
	if n != i {
		h.swap(i, n)
		if !h.down(i, n) {
			h.up(i)
		}
	}
	h.dropLast()
}

// pop takes out the earliest entry.
func (h *timerHeap) pop() *invocation {
	n := len(*h) - 1
	h.swap(0, n)
	h.down(0, n)
	return h.dropLast()
}

func (h *timerHeap) dropLast() *invocation {
	old := *h
	n := len(old) - 1
	inv := old[n].inv
	old[n] = timerEntry{}
	inv.hidx = -1
	*h = old[:n]
	return inv
}

func (h timerHeap) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].inv.hidx, h[j].inv.hidx = i, j
}

func (h timerHeap) up(j int) {
	for {
		i := (j - 1) / 2 // parent
		if i == j || h[j].at >= h[i].at {
			break
		}
		h.swap(i, j)
		j = i
	}
}

func (h timerHeap) down(i0, n int) bool {
	i := i0
	for {
		j1 := 2*i + 1
		if j1 >= n || j1 < 0 { // j1 < 0 after int overflow
			break
		}
		j := j1 // left child
		if j2 := j1 + 1; j2 < n && h[j2].at < h[j1].at {
			j = j2 // right child
		}
		if h[j].at >= h[i].at {
			break
		}
		h.swap(i, j)
		i = j
	}
	return i > i0
}

// timerFIFO holds the timers of one fixed duration (T_ref, the invoker's
// hold, T_inact, T_last, the performer timeout): armed at non-decreasing times, they expire in
// the order they were armed, so a queue does what the heap did at O(1)
// per operation. Those timers are most of them: every invocation spends
// its reference hold in one. A timer re-armed or disarmed leaves its
// entry behind with no invocation (found through inv.fseq), which is dropped when
// it reaches the head.
type timerFIFO struct {
	d     int64 // the duration, in nanoseconds
	slack int64 // how late its timers may fire, see machine.wakeAt
	items []timerEntry
	head  int    // first live position in items
	base  uint64 // sequence number of items[0]
}

// push adds inv at deadline at and returns its sequence number. A
// deadline before the last one (the callers' clocks were read before
// they took the lock, in any order) is moved to it: a fixed-duration
// timer may fire a little late, never out of order.
func (q *timerFIFO) push(inv *invocation, at int64) uint64 {
	if n := len(q.items); n > q.head && q.items[n-1].at > at {
		at = q.items[n-1].at
	}
	if q.head > 0 && q.head >= len(q.items)/2 && len(q.items) == cap(q.items) {
		// Slide the live entries down rather than grow.
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items = q.items[:n]
		q.base += uint64(q.head)
		q.head = 0
	}
	q.items = append(q.items, timerEntry{at, inv})
	return q.base + uint64(len(q.items)-1)
}

// clear forgets the entry with sequence number seq.
func (q *timerFIFO) clear(seq uint64) { q.items[seq-q.base].inv = nil }

// first returns the earliest live entry, dropping dead ones at the head.
func (q *timerFIFO) first() (timerEntry, bool) {
	for q.head < len(q.items) {
		if e := q.items[q.head]; e.inv != nil {
			return e, true
		}
		q.head++
	}
	if q.head > 0 {
		// Empty: start again at the front of the array.
		q.base += uint64(len(q.items))
		clear(q.items)
		q.items, q.head = q.items[:0], 0
	}
	return timerEntry{}, false
}

// pop takes out the earliest live entry, which first found.
func (q *timerFIFO) pop() *invocation {
	e := &q.items[q.head]
	inv := e.inv
	e.inv = nil
	q.head++
	inv.fq = 0
	return inv
}
