package storetest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// modelDelivery is the reference model's view of one queued delivery.
type modelDelivery struct {
	id       int64
	device   uint32
	state    store.DeliveryState
	next     time.Time
	expires  time.Time
	attempts int
	prio     uint8
}

type deliveryModel struct {
	rows     map[int64]*modelDelivery
	order    []int64                  // queueing order
	inflight map[*modelDelivery]int64 // rows left in flight between steps, with their store ids
}

func (m *deliveryModel) due(now time.Time) []uint32 {
	var out []uint32
	for _, id := range m.order {
		r := m.rows[id]
		if r.state == store.DeliveryQueued && !r.next.After(now) && !slices.Contains(out, r.device) {
			out = append(out, r.device)
		}
	}
	slices.Sort(out)
	return out
}

func (m *deliveryModel) claimable(dev uint32, now time.Time, lowest *uint8) (*modelDelivery, error) {
	for _, r := range m.rows {
		if r.device == dev && r.state == store.DeliveryInFlight {
			return nil, store.ErrBusy
		}
	}
	for _, id := range m.order {
		r := m.rows[id]
		if r.device == dev && r.state == store.DeliveryQueued && !r.next.After(now) && (lowest == nil || r.prio >= *lowest) {
			return r, nil
		}
	}
	return nil, store.ErrNotFound
}

func (m *deliveryModel) nextDue(after time.Time) (time.Time, bool) {
	var best time.Time
	for _, r := range m.rows {
		if r.state != store.DeliveryQueued {
			continue
		}
		for _, t := range []time.Time{r.next, r.expires} {
			if t.After(after) && (best.IsZero() || t.Before(best)) {
				best = t
			}
		}
	}
	return best, !best.IsZero()
}

// testDeliveryModel drives the delivery queue with random operations and
// checks every answer against a model of the state machine:
// queued -> in-flight -> delivered | failed | queued, queued -> failed by
// expiry, at most one in flight per device, FIFO per device.
func testDeliveryModel(t *testing.T, s store.Store) {
	ctx := context.Background()
	for seed := range uint64(3) {
		rng := rand.New(rand.NewPCG(seed, 42))
		m := &deliveryModel{rows: map[int64]*modelDelivery{}, inflight: map[*modelDelivery]int64{}}
		// Each seed uses its own devices and time span, so the rows of
		// earlier seeds (all finished below) never interfere.
		base := t0.Add(time.Duration(seed) * 1000 * time.Hour)
		now := base
		devBase := uint32(seed*10 + 1)
		msg := 0
		step := func(op string) string { return fmt.Sprintf("seed %d op %s", seed, op) }
		for i := range 400 {
			dev := devBase + uint32(rng.IntN(3))
			switch k := rng.IntN(10); {
			case k < 3: // enqueue
				msg++
				d := store.NewDelivery{Device: dev, MessageID: fmt.Sprintf("s%d-m%d", seed, msg), ContentType: 32,
					Content: []byte{byte(msg)}, Priority: uint8(rng.IntN(3)),
					NextAttempt: now.Add(time.Duration(rng.IntN(120)-30) * time.Second),
					Expires:     now.Add(time.Duration(30+rng.IntN(600)) * time.Second)}
				must(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{d}}))
				// Learn the id through the queue summary: claim order is
				// checked against message ids instead.
				m.rows[int64(msg)] = &modelDelivery{id: int64(msg), device: dev, state: store.DeliveryQueued,
					next: d.NextAttempt.Truncate(time.Millisecond), expires: d.Expires.Truncate(time.Millisecond), prio: d.Priority}
				m.order = append(m.order, int64(msg))
			case k < 6: // claim, then finish with a random outcome
				var lowest *uint8
				if rng.IntN(4) == 0 {
					l := uint8(rng.IntN(3))
					lowest = &l
				}
				want, wantErr := m.claimable(dev, now, lowest)
				got, err := s.ClaimDelivery(ctx, dev, now, store.Limits{LowestPriority: lowest})
				if wantErr != nil {
					if !errors.Is(err, wantErr) {
						t.Fatalf("%s: claim device %d: %v, want %v", step(fmt.Sprint(i)), dev, err, wantErr)
					}
					continue
				}
				if err != nil {
					t.Fatalf("%s: claim: %v", step(fmt.Sprint(i)), err)
				}
				if got.MessageID != fmt.Sprintf("s%d-m%d", seed, want.id) || got.Attempts != want.attempts+1 {
					t.Fatalf("%s: claimed %s attempt %d, want m%d attempt %d", step(fmt.Sprint(i)), got.MessageID,
						got.Attempts, want.id, want.attempts+1)
				}
				want.state, want.attempts = store.DeliveryInFlight, want.attempts+1
				// Finish now or leave in flight for a later finish.
				if rng.IntN(3) > 0 {
					finishModel(t, s, m, want, got.ID, rng, now)
				} else {
					m.inflight[want] = got.ID
				}
			case k < 7: // finish a delivery left in flight
				for r, id := range m.inflight {
					finishModel(t, s, m, r, id, rng, now)
					break
				}
			case k < 8: // wake
				n, err := s.WakeDevice(ctx, dev, now)
				must(t, err)
				woken := 0
				for _, r := range m.rows {
					if r.device == dev && r.state == store.DeliveryQueued && r.next.After(now) {
						r.next = now.Truncate(time.Millisecond)
						woken++
					}
				}
				if n != woken {
					t.Fatalf("%s: woke %d, want %d", step(fmt.Sprint(i)), n, woken)
				}
			case k < 9: // expire
				exp, err := s.ExpiredDeliveries(ctx, now, 1000)
				must(t, err)
				var want []string
				for _, id := range m.order {
					if r := m.rows[id]; r.state == store.DeliveryQueued && !r.expires.After(now) {
						want = append(want, fmt.Sprintf("s%d-m%d", seed, id))
					}
				}
				var got []string
				for _, d := range exp {
					if d.Device < devBase || d.Device >= devBase+3 {
						continue
					}
					got = append(got, d.MessageID)
					must(t, s.FinishDelivery(ctx, d.ID, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryFailed, Status: 3}))
					var id int64
					fmt.Sscanf(d.MessageID, fmt.Sprintf("s%d-m%%d", seed), &id)
					m.rows[id].state = store.DeliveryFailed
				}
				if !slices.Equal(got, want) {
					t.Fatalf("%s: expired %v, want %v", step(fmt.Sprint(i)), got, want)
				}
			default: // time passes
				now = now.Add(time.Duration(rng.IntN(90)) * time.Second)
			}
			// Invariants after every step.
			due := dueDevices(t, s, now)
			due = slices.DeleteFunc(due, func(d uint32) bool { return d < devBase || d >= devBase+3 })
			if want := m.due(now); !slices.Equal(due, want) {
				t.Fatalf("%s: due %v, want %v", step(fmt.Sprint(i)), due, want)
			}
			next, ok, err := s.NextDue(ctx, now)
			must(t, err)
			if wantNext, wantOK := m.nextDue(now); ok != wantOK || !next.Equal(wantNext) {
				t.Fatalf("%s: next due %v %v, want %v %v", step(fmt.Sprint(i)), next, ok, wantNext, wantOK)
			}
		}
		// Drain: finish everything so the next seed starts from a clean
		// queue (NextDue spans all devices).
		for r, id := range m.inflight {
			must(t, s.FinishDelivery(ctx, id, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
			r.state = store.DeliveryDelivered
			delete(m.inflight, r)
		}
		exp, err := s.ExpiredDeliveries(ctx, now.Add(1000*time.Hour), 100000)
		must(t, err)
		for _, d := range exp {
			must(t, s.FinishDelivery(ctx, d.ID, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryFailed}))
		}
		st, err := s.Stats(ctx)
		must(t, err)
		if st.Deliveries[store.DeliveryQueued] != 0 || st.Deliveries[store.DeliveryInFlight] != 0 {
			t.Fatalf("seed %d: not drained: %+v", seed, st)
		}
	}
}

func finishModel(t *testing.T, s store.Store, m *deliveryModel, r *modelDelivery, id int64, rng *rand.Rand, now time.Time) {
	t.Helper()
	ctx := context.Background()
	// A finish from the wrong state is refused and changes nothing.
	if err := s.FinishDelivery(ctx, id, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryDelivered}); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("finish from the wrong state: %v", err)
	}
	var res store.DeliveryResult
	switch rng.IntN(4) {
	case 0:
		res = store.DeliveryResult{State: store.DeliveryDelivered, Status: 2}
	case 1:
		res = store.DeliveryResult{State: store.DeliveryFailed, Status: 3}
	case 2:
		res = store.DeliveryResult{State: store.DeliveryQueued, NextAttempt: now.Add(time.Duration(rng.IntN(300)) * time.Second)}
	default:
		res = store.DeliveryResult{State: store.DeliveryQueued, NextAttempt: now, Requeue: true}
	}
	must(t, s.FinishDelivery(ctx, id, store.DeliveryInFlight, res))
	r.state = res.State
	if res.State == store.DeliveryQueued {
		r.next = res.NextAttempt.Truncate(time.Millisecond)
		if res.Requeue {
			r.attempts--
		}
	}
	delete(m.inflight, r)
}

type modelRelay struct {
	addr    string
	state   store.RelayState
	next    time.Time
	expires time.Time
	id      int64 // learned at the first claim
}

// testRelayModel checks relay claims, finishes and expiry against a model:
// claims take due, unexpired, queued recipients in queueing order up to
// the limit; expired ones are only listed by ExpiredRelays.
func testRelayModel(t *testing.T, s store.Store) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 7))
	var rows []*modelRelay
	byAddr := map[string]*modelRelay{}
	now := t0
	n := 0
	count := func(st store.RelayState) int {
		c := 0
		for _, r := range rows {
			if r.state == st {
				c++
			}
		}
		return c
	}
	for i := range 300 {
		switch k := rng.IntN(8); {
		case k < 3:
			nr := store.NewRelay{From: "f@x", Message: []byte{byte(i)},
				NextAttempt: now.Add(time.Duration(rng.IntN(100)-20) * time.Second),
				Expires:     now.Add(time.Duration(20+rng.IntN(400)) * time.Second)}
			for range 1 + rng.IntN(3) {
				n++
				a := fmt.Sprintf("r%d@x", n)
				nr.Recipients = append(nr.Recipients, store.RelayRecipient{Addr: a})
				r := &modelRelay{addr: a, state: store.RelayQueued, next: nr.NextAttempt, expires: nr.Expires}
				rows = append(rows, r)
				byAddr[a] = r
			}
			must(t, s.Enqueue(ctx, store.Work{Relays: []store.NewRelay{nr}}))
		case k < 6:
			limit := 1 + rng.IntN(4)
			var want []string
			for _, r := range rows {
				if len(want) < limit && r.state == store.RelayQueued && !r.next.After(now) && r.expires.After(now) {
					want = append(want, r.addr)
				}
			}
			bs, err := s.ClaimRelays(ctx, now, limit)
			must(t, err)
			var got []string
			var results []store.RelayResult
			for _, b := range bs {
				for _, rc := range b.Recipients {
					got = append(got, rc.Addr)
					r := byAddr[rc.Addr]
					r.id, r.state = rc.ID, store.RelaySending
					res := store.RelayResult{ID: rc.ID, From: store.RelaySending}
					switch rng.IntN(3) {
					case 0:
						res.State = store.RelaySent
					case 1:
						res.State = store.RelayFailed
					default:
						res.State, res.NextAttempt = store.RelayQueued, now.Add(time.Duration(rng.IntN(200))*time.Second)
					}
					results = append(results, res)
					r.state, r.next = res.State, res.NextAttempt
				}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("step %d: claimed %v, want %v", i, got, want)
			}
			must(t, s.FinishRelays(ctx, results, store.Work{}))
		case k < 7:
			var want []string
			for _, r := range rows {
				if r.state == store.RelayQueued && !r.expires.After(now) {
					want = append(want, r.addr)
				}
			}
			bs, err := s.ExpiredRelays(ctx, now, 1000)
			must(t, err)
			var got []string
			var results []store.RelayResult
			for _, b := range bs {
				for _, rc := range b.Recipients {
					got = append(got, rc.Addr)
					results = append(results, store.RelayResult{ID: rc.ID, From: store.RelayQueued, State: store.RelayFailed})
					byAddr[rc.Addr].state = store.RelayFailed
				}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("step %d: expired %v, want %v", i, got, want)
			}
			must(t, s.FinishRelays(ctx, results, store.Work{}))
		default:
			now = now.Add(time.Duration(rng.IntN(60)) * time.Second)
		}
		st, err := s.Stats(ctx)
		must(t, err)
		for _, state := range []store.RelayState{store.RelayQueued, store.RelaySending, store.RelaySent, store.RelayFailed} {
			if st.Relays[state] != count(state) {
				t.Fatalf("step %d: %d %s, want %d", i, st.Relays[state], state, count(state))
			}
		}
	}
}
