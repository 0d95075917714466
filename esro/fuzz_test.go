package esro

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/internal/captures"
)

// FuzzReceive drives the endpoint's receive path (the machine behind it)
// with a script decoded from the input: datagrams from two peers, clock
// steps, answers and invocations. It checks the bookkeeping after each step.
func FuzzReceive(f *testing.F) {
	for _, s := range captures.All() {
		for _, d := range s.Datagrams {
			if len(d.Payload) < 200 {
				f.Add(append([]byte{0, byte(len(d.Payload))}, d.Payload...))
			}
		}
	}
	f.Add([]byte{0, 7, 0xd0, 0x5e, 0x82, 'd', 'a', 't', 'e', 3, 0, 2, 30, 0, 2, 0x03, 0x5e, 2, 255})
	f.Add([]byte{4, 0, 2, 5, 0, 3, 0x81, 0x01, 'x', 2, 200, 2, 200})
	f.Fuzz(func(t *testing.T, script []byte) {
		h := newHarness(&testing.T{}, func(c *Config) {
			c.MaxInvocations, c.MaxPeerInvocations = 64, 16
			c.MaxUnproven, c.MaxUnprovenPerPrefix, c.MaxUnprovenPerAddr, c.MaxTombstones = 24, 20, 12, 8
		})
		h.m.bind(13, ThreeWay, HandlerFunc(nil))
		h.m.bind(7, TwoWay, HandlerFunc(nil))
		peers := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:2002"), netip.MustParseAddrPort("192.0.2.2:2003")}
		for len(script) >= 2 {
			op, arg := script[0], script[1]
			script = script[2:]
			switch op % 8 {
			case 0, 1: // a datagram of arg octets from peer op%2
				n := min(int(arg), len(script))
				h.m.receive(h.now, script[:n], peers[op%2])
				script = script[n:]
			case 2: // clock step of arg × 250 ms
				h.now = h.now.Add(time.Duration(arg) * 250 * time.Millisecond)
				h.m.advance(h.now)
			case 3: // answer or refuse a performer invocation
				if len(h.started) > 0 {
					inv := h.started[int(arg)%len(h.started)]
					if arg&2 != 0 {
						h.m.refuse(h.now, inv, Encoding(arg>>6), arg, []byte{arg})
					} else {
						h.m.answer(h.now, inv, arg&1 == 1, Encoding(arg>>6), arg, []byte{arg})
					}
				}
			case 4: // invoke towards a peer
				hs := TwoWay + Handshake(arg&1)
				h.m.invoke(h.now, &Request{To: peers[arg>>7], SAP: arg & 15, Handshake: hs, Data: []byte{arg}}, peers[arg>>7])
			case 5: // abandon an invoker
				for _, inv := range h.m.invokerMap() {
					h.m.abandon(h.now, inv, nil)
					break
				}
			case 6: // the handler proves its invoker
				if len(h.started) > 0 {
					h.m.proveInvocation(h.now, h.started[int(arg)%len(h.started)])
				}
			case 7: // an ICMP error quoting an INVOKE sent
				for _, inv := range h.m.invokerMap() {
					if len(inv.kept) > 0 {
						h.m.unreachable(h.now, icmpReport{to: inv.addr, payload: inv.kept[:min(int(arg), len(inv.kept))]})
					}
					break
				}
			}
			h.m.takeOut()
			checkInvariants(t, h.m)
		}
	})
}

func checkInvariants(t *testing.T, m *machine) {
	t.Helper()
	held := map[netip.AddrPort]int{}
	perf := map[netip.AddrPort]int{}
	invokers, performers := m.invokerMap(), m.performerMap()
	for k, inv := range invokers {
		if inv.perf || inv.key != k || inv.st < stInvokeSent || inv.st > stInvokerRefWait {
			t.Fatalf("bad invoker %+v", inv)
		}
		if !inv.peer.isHeld(k.ref) {
			t.Fatalf("invoker ref %d not held", k.ref)
		}
		held[k.peer]++
	}
	for k, inv := range performers {
		if !inv.perf || inv.key != k || inv.st < stInvokeReceived {
			t.Fatalf("bad performer %+v", inv)
		}
		perf[k.peer]++
	}
	for k, p := range m.peers {
		if p.nheld != held[k] || p.perf.n != perf[k] {
			t.Fatalf("peer %v counts %d/%d, tables %d/%d", k, p.nheld, p.perf.n, held[k], perf[k])
		}
	}
	perIP := map[netip.Addr]int{}
	for _, inv := range performers {
		perIP[inv.addr.Addr()]++
	}
	for a, n := range perIP {
		if l := m.perfPerIP[a]; l == nil || l.n != n || n > m.cfg.MaxPeerInvocations {
			t.Fatalf("address %v: %d performers, counted %+v", a, n, l)
		}
	}
	pointing := map[*ipLoad]int{}
	for _, p := range m.peers {
		if p.ip != nil {
			if m.perfPerIP[p.key.Addr()] != p.ip {
				t.Fatalf("peer %v counts at a forgotten address entry", p.key)
			}
			pointing[p.ip]++
		}
	}
	for a, l := range m.perfPerIP {
		if l.peers == 0 || l.peers != pointing[l] || l.n != perIP[a] {
			t.Fatalf("address %v: count %+v, %d peers pointing, %d performers", a, l, pointing[l], perIP[a])
		}
	}
	unproven, unIP, unPfx := 0, map[netip.Addr]int{}, map[netip.Prefix]int{}
	for _, inv := range performers {
		if inv.unproven {
			unproven++
			unIP[inv.addr.Addr()]++
			unPfx[prefixOf(inv.addr.Addr())]++
		}
	}
	hs := &m.hostile
	if unproven != hs.unproven || len(unIP) != len(hs.unprovenIP) || len(unPfx) != len(hs.unprovenPfx) ||
		unproven > m.cfg.MaxUnproven || int(m.st.unproven.Load()) != unproven {
		t.Fatalf("unproven: %d counted %d", unproven, hs.unproven)
	}
	for a, n := range unIP {
		if hs.unprovenIP[a] != n || n > m.cfg.MaxUnprovenPerAddr {
			t.Fatalf("unproven from %v: %d counted %d", a, n, hs.unprovenIP[a])
		}
	}
	for p, n := range unPfx {
		if hs.unprovenPfx[p] != n || n > m.cfg.MaxUnprovenPerPrefix {
			t.Fatalf("unproven from %v: %d counted %d", p, n, hs.unprovenPfx[p])
		}
	}
	if len(hs.tombs) > m.cfg.MaxTombstones || int(m.st.tombstones.Load()) != len(hs.tombs) {
		t.Fatalf("%d tombstones", len(hs.tombs))
	}
	for k, tb := range hs.tombs {
		if performers[k] != nil || tb.dead || tb.key != k || len(tb.kept) < 3 {
			t.Fatalf("tombstone %+v", tb)
		}
	}
	if m.ninv != len(invokers) || m.nperf != len(performers) {
		t.Fatalf("counted %d/%d invocations, tables %d/%d", m.ninv, m.nperf, len(invokers), len(performers))
	}
	if m.total() > m.cfg.MaxInvocations {
		t.Fatalf("%d invocations over the cap", m.total())
	}
	if int(m.st.inflightInv.Load()) != len(invokers) || int(m.st.inflightPerf.Load()) != len(performers) {
		t.Fatal("in-flight gauges disagree with the tables")
	}
	for i, e := range m.timers {
		if inv := e.inv; inv.hidx != i || inv.timer == tNone || inv.st == stReleased {
			t.Fatalf("timer heap entry %d: %+v", i, inv)
		}
		if p := (i - 1) / 2; i > 0 && m.timers[p].at > e.at {
			t.Fatalf("timer heap out of order at %d", i)
		}
	}
	for qi := range m.fifos {
		q := &m.fifos[qi]
		for i := q.head; i < len(q.items); i++ {
			e := q.items[i]
			if i > q.head && q.items[i-1].at > e.at {
				t.Fatalf("timer queue %d out of order at %d", qi, i)
			}
			if inv := e.inv; inv != nil && (int(inv.fq) != qi+1 || inv.fseq != q.base+uint64(i) || inv.hidx >= 0 ||
				inv.timer == tNone || inv.st == stReleased) {
				t.Fatalf("timer queue %d entry %d: %+v", qi, i, inv)
			}
		}
	}
	active := 0
	for _, inv := range invokers {
		if inv.st.active() {
			active++
		}
		if inv.st != stReleased && inv.timer == tNone {
			t.Fatalf("invoker without a timer in %v", inv.st)
		}
	}
	for _, inv := range performers {
		if inv.st.active() {
			active++
		}
	}
	if active != m.active {
		t.Fatalf("active %d, counted %d", m.active, active)
	}
}

// invokerMap and performerMap return the invocations of the peers'
// tables by key, failing on an entry filed under the wrong peer or number
// or counted wrongly.
func (m *machine) invokerMap() map[invKey]*invocation { return m.roleMap(false) }

func (m *machine) performerMap() map[invKey]*invocation { return m.roleMap(true) }

func (m *machine) roleMap(perf bool) map[invKey]*invocation {
	all := map[invKey]*invocation{}
	for k, p := range m.peers {
		t := &p.inv
		if perf {
			t = &p.perf
		}
		n := 0
		t.each(func(inv *invocation) {
			n++
			if inv.key.peer != k || t.get(inv.key.ref) != inv || all[inv.key] != nil {
				panic(fmt.Sprintf("invocation %v filed under peer %v", inv.key, k))
			}
			all[inv.key] = inv
		})
		if n != t.n {
			panic(fmt.Sprintf("peer %v: table counts %d, holds %d", k, t.n, n))
		}
	}
	return all
}
