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
