package storetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// The operator's queue methods (emsdp queue): listing with filters and
// counts, one entry in full, retry and remove, which touch queued entries
// only.

func dref(id int64) store.QueueRef { return store.QueueRef{Kind: store.QueueDelivery, ID: id} }
func rref(id int64) store.QueueRef { return store.QueueRef{Kind: store.QueueRelay, ID: id} }

func skip(ref store.QueueRef, state string) store.QueueSkip {
	return store.QueueSkip{Ref: ref, State: state}
}

// namesOf names entries by kind and message id or recipient, which the
// tests know before the store assigns ids: "D a", "R x@x".
func namesOf(es []store.QueueEntry) []string {
	var out []string
	for _, e := range es {
		if e.Ref.Kind == store.QueueDelivery {
			out = append(out, "D "+e.MessageID)
		} else {
			out = append(out, "R "+e.Recipient)
		}
	}
	return out
}

// queueFixture is deliveries and relays in every state, by name.
type queueFixture struct {
	refs map[string]store.QueueRef
	// claimed entries, for their claimer to finish at the end
	inflight store.QueueRef
	sending  store.QueueRef
}

func (f *queueFixture) ref(t *testing.T, name string) store.QueueRef {
	t.Helper()
	r, ok := f.refs[name]
	if !ok {
		t.Fatalf("no entry %q", name)
	}
	return r
}

// newQueueFixture: deliveries "a" (device 10, in flight), "b" (10, queued,
// due in an hour), "c" (11, failed), "e" (11, due an hour ago), "d" (13,
// delivered); relays "s@x" (sending), "x@x" and "y@x" (one message, due in
// an hour) and "z@x" (a DSN, due in an hour).
func newQueueFixture(t *testing.T, s store.Store) *queueFixture {
	t.Helper()
	ctx := context.Background()
	f := &queueFixture{refs: map[string]store.QueueRef{}}
	a := delivery(10, "a", t0)
	b := delivery(10, "b", t0.Add(time.Hour))
	b.Report = store.Report{Device: 20, Mail: "o@x", Flags: 0x20, Recipient: "L:10", MessageID: "L:b", Headers: []byte("H: v\r\n"), DSN: "ENVID=e1"}
	c := delivery(11, "c", t0)
	e := delivery(11, "e", t0.Add(-time.Hour))
	d := delivery(13, "d", t0)
	must(t, s.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{a, b, c, e, d},
		Relays: []store.NewRelay{
			{From: "198.036@e", Message: []byte("sending"), NextAttempt: t0, Expires: t0.Add(2 * time.Hour),
				Recipients: []store.RelayRecipient{{Addr: "s@x"}}},
			{From: "198.036@e", Message: []byte("message xy"), NextAttempt: t0.Add(time.Hour), Expires: t0.Add(2 * time.Hour),
				Recipients: []store.RelayRecipient{{Addr: "x@x", Report: store.Report{Device: 198036, MessageID: "L:1"}}, {Addr: "y@x"}}},
			{From: "", Message: []byte("dsn"), NextAttempt: t0.Add(time.Hour), Expires: t0.Add(2 * time.Hour),
				Recipients: []store.RelayRecipient{{Addr: "z@x"}}},
		},
	}))
	l, err := s.ListQueue(ctx, store.QueueFilter{})
	must(t, err)
	for i, name := range namesOf(l.Entries) {
		f.refs[name] = l.Entries[i].Ref
	}
	claim := func(dev uint32, want string) *store.Delivery {
		t.Helper()
		got, err := s.ClaimDelivery(ctx, dev, t0, store.Limits{})
		must(t, err)
		if got.MessageID != want {
			t.Fatalf("claimed %s, want %s", got.MessageID, want)
		}
		return got
	}
	f.inflight = dref(claim(10, "a").ID)
	got := claim(11, "c") // FIFO by queueing, though "e" is due earlier
	must(t, s.FinishDelivery(ctx, got.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryFailed,
		Error: "refused"}))
	got = claim(13, "d")
	must(t, s.FinishDelivery(ctx, got.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	bs, err := s.ClaimRelays(ctx, t0, 10)
	must(t, err)
	if len(bs) != 1 || len(bs[0].Recipients) != 1 || bs[0].Recipients[0].Addr != "s@x" {
		t.Fatalf("claimed relays %+v", bs)
	}
	f.sending = rref(bs[0].Recipients[0].ID)
	return f
}

// finish ends the fixture's claimed entries as their claimer would: the
// operator's calls in between must not have disturbed them.
func (f *queueFixture) finish(t *testing.T, s store.Store) {
	t.Helper()
	ctx := context.Background()
	must(t, s.FinishDelivery(ctx, f.inflight.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	must(t, s.FinishRelays(ctx, []store.RelayResult{{ID: f.sending.ID, From: store.RelaySending, State: store.RelaySent}},
		store.Work{}))
}

func testQueueList(t *testing.T, s store.Store) {
	ctx := context.Background()
	f := newQueueFixture(t, s)
	all := []string{"D a", "D b", "D c", "D e", "D d", "R s@x", "R x@x", "R y@x", "R z@x"}
	type counts = map[store.QueueKind]map[string]int
	for _, tc := range []struct {
		name   string
		f      store.QueueFilter
		want   []string
		counts counts
	}{
		{"everything", store.QueueFilter{}, all, counts{
			store.QueueDelivery: {"inflight": 1, "queued": 2, "failed": 1, "delivered": 1},
			store.QueueRelay:    {"sending": 1, "queued": 3}}},
		{"queued", store.QueueFilter{States: []string{"queued"}}, []string{"D b", "D e", "R x@x", "R y@x", "R z@x"},
			counts{store.QueueDelivery: {"queued": 2}, store.QueueRelay: {"queued": 3}}},
		{"in flight", store.QueueFilter{States: []string{"inflight", "sending"}}, []string{"D a", "R s@x"},
			counts{store.QueueDelivery: {"inflight": 1}, store.QueueRelay: {"sending": 1}}},
		{"finished", store.QueueFilter{States: []string{"delivered", "sent", "failed"}}, []string{"D c", "D d"},
			counts{store.QueueDelivery: {"failed": 1, "delivered": 1}}},
		{"deliveries", store.QueueFilter{Kind: store.QueueDelivery}, all[:5],
			counts{store.QueueDelivery: {"inflight": 1, "queued": 2, "failed": 1, "delivered": 1}}},
		{"queued relays", store.QueueFilter{Kind: store.QueueRelay, States: []string{"queued"}}, []string{"R x@x", "R y@x", "R z@x"},
			counts{store.QueueRelay: {"queued": 3}}},
		{"device", store.QueueFilter{Device: 10}, []string{"D a", "D b"}, counts{store.QueueDelivery: {"inflight": 1, "queued": 1}}},
		{"device, deliveries", store.QueueFilter{Kind: store.QueueDelivery, Device: 11, States: []string{"queued"}},
			[]string{"D e"}, counts{store.QueueDelivery: {"queued": 1}}},
		{"nothing", store.QueueFilter{Device: 10, States: []string{"failed"}}, nil, counts{}},
		{"unknown state", store.QueueFilter{States: []string{"bogus"}}, nil, counts{}},
		{"limit", store.QueueFilter{Limit: 2}, all[:2], counts{
			store.QueueDelivery: {"inflight": 1, "queued": 2, "failed": 1, "delivered": 1},
			store.QueueRelay:    {"sending": 1, "queued": 3}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := s.ListQueue(ctx, tc.f)
			must(t, err)
			if got := namesOf(l.Entries); !slices.Equal(got, tc.want) {
				t.Errorf("entries %v, want %v", got, tc.want)
			}
			for k, byState := range tc.counts {
				for st, n := range byState {
					if l.Counts[k][st] != n {
						t.Errorf("count %s %s: %d, want %d (counts %v)", k, st, l.Counts[k][st], n, l.Counts)
					}
				}
			}
			want := 0
			for _, byState := range tc.counts {
				for _, n := range byState {
					want += n
				}
			}
			if l.Matched() != want || l.Truncated() != (want > len(tc.want)) {
				t.Errorf("matched %d truncated %v, want %d (counts %v)", l.Matched(), l.Truncated(), want, l.Counts)
			}
		})
	}
	for _, bad := range []store.QueueFilter{{Kind: "bogus"}, {Kind: store.QueueRelay, Device: 10}, {Limit: -1}} {
		if _, err := s.ListQueue(ctx, bad); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("ListQueue(%+v): %v, want ErrInvalid", bad, err)
		}
	}

	// The fields of a list entry; reports and contents only in QueueEntry.
	l, err := s.ListQueue(ctx, store.QueueFilter{})
	must(t, err)
	byName := map[string]store.QueueEntry{}
	for i, name := range namesOf(l.Entries) {
		byName[name] = l.Entries[i]
	}
	b, x, z, a := byName["D b"], byName["R x@x"], byName["R z@x"], byName["D a"]
	if b.State != "queued" || b.Device != 10 || b.Size != len("content b") || b.ContentType != 32 || b.Priority != 1 ||
		b.Attempts != 0 || !b.NextAttempt.Equal(t0.Add(time.Hour)) || !b.Expires.Equal(t0.Add(2*time.Hour)) ||
		b.Created.IsZero() || b.Updated.IsZero() || b.Recipient != "" || b.Report.Device != 0 || b.Report.MessageID != "" || b.Content != nil {
		t.Errorf("delivery b listed as %+v", b)
	}
	if a.State != "inflight" || a.Attempts != 1 {
		t.Errorf("delivery a listed as %+v", a)
	}
	if x.State != "queued" || x.Recipient != "x@x" || x.From != "198.036@e" || x.MessageID != "L:1" || x.MessageRef == 0 ||
		x.Size != len("message xy") || x.Device != 0 || !x.NextAttempt.Equal(t0.Add(time.Hour)) || x.Content != nil {
		t.Errorf("relay x listed as %+v", x)
	}
	if y := byName["R y@x"]; y.MessageRef != x.MessageRef || y.MessageID != "" {
		t.Errorf("relay y listed as %+v (x's message %d)", y, x.MessageRef)
	}
	if z.From != "" || z.MessageRef == x.MessageRef || z.Size != 3 {
		t.Errorf("relay z listed as %+v", z)
	}
	if c := byName["D c"]; c.State != "failed" || c.LastError != "refused" || c.Attempts != 1 {
		t.Errorf("delivery c listed as %+v", c)
	}
	if s := byName["R s@x"]; s.State != "sending" || s.Attempts != 1 {
		t.Errorf("relay s listed as %+v", s)
	}

	got, err := s.QueueEntry(ctx, f.ref(t, "D b"))
	must(t, err)
	if got.Ref != f.ref(t, "D b") || got.State != "queued" || got.MessageID != "b" || string(got.Content) != "content b" ||
		got.Size != len("content b") || got.Report.Device != 20 || got.Report.Mail != "o@x" || got.Report.Flags != 0x20 ||
		got.Report.Recipient != "L:10" || got.Report.MessageID != "L:b" || string(got.Report.Headers) != "H: v\r\n" ||
		!got.NextAttempt.Equal(t0.Add(time.Hour)) {
		t.Errorf("QueueEntry(b) %+v", got)
	}
	got, err = s.QueueEntry(ctx, f.ref(t, "R x@x"))
	must(t, err)
	if got.Recipient != "x@x" || got.From != "198.036@e" || string(got.Content) != "message xy" || got.MessageID != "L:1" ||
		got.Report.Device != 198036 || got.MessageRef != x.MessageRef || got.State != "queued" || got.Size != len("message xy") {
		t.Errorf("QueueEntry(x) %+v", got)
	}
	for _, ref := range []store.QueueRef{dref(987654), rref(987654)} {
		if _, err := s.QueueEntry(ctx, ref); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("QueueEntry(%v): %v, want ErrNotFound", ref, err)
		}
	}
	if _, err := s.QueueEntry(ctx, store.QueueRef{Kind: "bogus", ID: 1}); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("QueueEntry of a bogus kind: %v", err)
	}
	f.finish(t, s)
}

// entryState is an entry's state and next attempt ("" when gone).
func entryState(t *testing.T, s store.Store, ref store.QueueRef) (string, time.Time) {
	t.Helper()
	e, err := s.QueueEntry(context.Background(), ref)
	if errors.Is(err, store.ErrNotFound) {
		return "", time.Time{}
	}
	must(t, err)
	return e.State, e.NextAttempt
}

func testQueueRetry(t *testing.T, s store.Store) {
	ctx := context.Background()
	f := newQueueFixture(t, s)
	now := t0.Add(time.Minute)
	// Named entries: queued ones become due at now; in-flight and
	// finished ones are left alone and said so; a name given twice counts
	// once.
	ch, err := s.RetryQueued(ctx, store.QueueSelect{Refs: []store.QueueRef{f.ref(t, "D b"), f.inflight, f.ref(t, "D c"),
		f.ref(t, "D d"), dref(987654), f.ref(t, "R x@x"), f.sending, f.ref(t, "D b")}}, now)
	must(t, err)
	wantSkipped := []store.QueueSkip{skip(f.inflight, "inflight"), skip(f.ref(t, "D c"), "failed"),
		skip(f.ref(t, "D d"), "delivered"), skip(dref(987654), ""), skip(f.sending, "sending")}
	if ch.Changed != 2 || ch.InFlight != 2 || !slices.Equal(ch.Skipped, wantSkipped) {
		t.Errorf("retry by refs: %+v, want 2 changed, 2 in flight, skipped %v", ch, wantSkipped)
	}
	for _, tc := range []struct {
		name  string
		state string
		next  time.Time
	}{
		{"D b", "queued", now}, {"R x@x", "queued", now}, {"R y@x", "queued", t0.Add(time.Hour)},
		{"D a", "inflight", t0}, {"D c", "failed", time.Time{}}, {"D d", "delivered", time.Time{}},
		{"D e", "queued", t0.Add(-time.Hour)}, {"R s@x", "sending", t0},
	} {
		st, next := entryState(t, s, f.ref(t, tc.name))
		if st != tc.state || !next.Equal(tc.next) {
			t.Errorf("%s after retry: %s next %v, want %s next %v", tc.name, st, next, tc.state, tc.next)
		}
	}
	if due := dueDevices(t, s, now); !slices.Contains(due, 10) {
		t.Errorf("device 10 not due after retry: %v", due)
	}
	if bs, _ := s.ClaimRelays(ctx, now, 1); len(bs) != 1 || bs[0].Recipients[0].Addr != "x@x" {
		t.Errorf("claim after retry: %+v", bs)
	} else {
		must(t, s.FinishRelays(ctx, []store.RelayResult{{ID: bs[0].Recipients[0].ID, From: store.RelaySending,
			State: store.RelayQueued, NextAttempt: t0.Add(time.Hour), Requeue: true}}, store.Work{}))
	}

	for _, tc := range []struct {
		name          string
		sel           store.QueueSelect
		changed, busy int
		due           []string // queued entries due at now afterwards (the rest keep their time)
	}{
		// Device 11's queued delivery "e" is due already and stays so.
		{"device with one queued", store.QueueSelect{Device: 11}, 1, 0, []string{"D b", "D e"}},
		{"device with one in flight", store.QueueSelect{Device: 10}, 1, 1, []string{"D b", "D e"}},
		{"device without entries", store.QueueSelect{Device: 99}, 0, 0, []string{"D b", "D e"}},
		{"all relays", store.QueueSelect{All: true, Kind: store.QueueRelay}, 3, 1, []string{"D b", "D e", "R x@x", "R y@x", "R z@x"}},
		{"all", store.QueueSelect{All: true}, 5, 2, []string{"D b", "D e", "R x@x", "R y@x", "R z@x"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch, err := s.RetryQueued(ctx, tc.sel, now)
			must(t, err)
			if ch.Changed != tc.changed || ch.InFlight != tc.busy || len(ch.Skipped) != 0 {
				t.Errorf("%+v, want %d changed, %d in flight", ch, tc.changed, tc.busy)
			}
			l, err := s.ListQueue(ctx, store.QueueFilter{States: []string{"queued"}})
			must(t, err)
			var due []string
			for i, name := range namesOf(l.Entries) {
				if !l.Entries[i].NextAttempt.After(now) {
					due = append(due, name)
				}
			}
			if !slices.Equal(due, tc.due) {
				t.Errorf("due after retry %v, want %v", due, tc.due)
			}
		})
	}
	if _, next := entryState(t, s, f.ref(t, "D e")); !next.Equal(t0.Add(-time.Hour)) {
		t.Errorf("an entry already due moved to %v", next)
	}
	for _, bad := range []store.QueueSelect{{}, {All: true, Device: 10}, {Refs: []store.QueueRef{dref(1)}, All: true},
		{Refs: []store.QueueRef{{Kind: "bogus", ID: 1}}}, {Refs: []store.QueueRef{dref(0)}},
		{Kind: store.QueueRelay}, {Device: 10, Kind: store.QueueDelivery}, {All: true, Kind: "bogus"}} {
		if _, err := s.RetryQueued(ctx, bad, now); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("RetryQueued(%+v): %v, want ErrInvalid", bad, err)
		}
	}
	f.finish(t, s)
	// Retrying finished entries never brings them back.
	ch, err = s.RetryQueued(ctx, store.QueueSelect{Refs: []store.QueueRef{f.inflight, f.sending}}, now)
	must(t, err)
	if ch.Changed != 0 || ch.InFlight != 0 || len(ch.Skipped) != 2 || ch.Skipped[0].State != "delivered" ||
		ch.Skipped[1].State != "sent" {
		t.Errorf("retry of finished entries: %+v", ch)
	}
}

// testQueueRetryForce: Force takes in-flight entries back into the queue,
// due at now with their attempts counted, whoever holds them; the
// holder's late outcome is then refused; finished entries stay finished.
func testQueueRetryForce(t *testing.T, s store.Store) {
	ctx := context.Background()
	f := newQueueFixture(t, s)
	now := t0.Add(time.Minute)
	force := func(sel store.QueueSelect, want int) {
		t.Helper()
		sel.Force = true
		ch, err := s.RetryQueued(ctx, sel, now)
		must(t, err)
		if ch.Forced != want || ch.InFlight != 0 {
			t.Errorf("forced retry of %+v: %+v, want %d forced and none left in flight", sel, ch, want)
		}
	}
	force(store.QueueSelect{Device: 11}, 0)
	force(store.QueueSelect{Refs: []store.QueueRef{f.inflight, f.ref(t, "D c")}}, 1)
	e, err := s.QueueEntry(ctx, f.inflight)
	must(t, err)
	if e.State != "queued" || e.Attempts != 1 || !e.NextAttempt.Equal(now) || e.Owner != 0 {
		t.Errorf("forced delivery: state %s, %d attempts, next %v, owner %d", e.State, e.Attempts, e.NextAttempt, e.Owner)
	}
	err = s.FinishDelivery(ctx, f.inflight.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered})
	wantErr(t, err, store.ErrConflict)
	if e, err := s.QueueEntry(ctx, f.ref(t, "D c")); err != nil || e.State != "failed" {
		t.Errorf("a finished entry after a forced retry: %v %v", e, err)
	}
	// The device can be claimed again at once: the forced entry first.
	d, err := s.ClaimDelivery(ctx, 10, now, store.Limits{})
	must(t, err)
	if d.ID != f.inflight.ID || d.Attempts != 2 {
		t.Errorf("claimed %d (attempts %d) after the forced retry, want %d", d.ID, d.Attempts, f.inflight.ID)
	}
	force(store.QueueSelect{All: true, Kind: store.QueueRelay}, 1)
	err = s.FinishRelays(ctx, []store.RelayResult{{ID: f.sending.ID, From: store.RelaySending, State: store.RelaySent}}, store.Work{})
	wantErr(t, err, store.ErrConflict)
	force(store.QueueSelect{All: true}, 1) // the delivery claimed again
	l, err := s.ListQueue(ctx, store.QueueFilter{States: []string{"inflight", "sending"}})
	must(t, err)
	if len(l.Entries) != 0 {
		t.Errorf("left in flight: %+v", l.Entries)
	}
}

func testQueueRemove(t *testing.T, s store.Store) {
	ctx := context.Background()
	f := newQueueFixture(t, s)
	ch, err := s.RemoveQueued(ctx, []store.QueueRef{f.ref(t, "D b"), f.inflight, f.ref(t, "D c"), f.ref(t, "D d"),
		dref(987654), f.ref(t, "R x@x"), f.sending, rref(987654), f.ref(t, "D b")})
	must(t, err)
	wantSkipped := []store.QueueSkip{skip(f.inflight, "inflight"), skip(f.ref(t, "D c"), "failed"),
		skip(f.ref(t, "D d"), "delivered"), skip(dref(987654), ""), skip(f.sending, "sending"), skip(rref(987654), "")}
	if ch.Changed != 2 || ch.InFlight != 2 || !slices.Equal(ch.Skipped, wantSkipped) {
		t.Errorf("remove: %+v, want 2 changed, 2 in flight, skipped %v", ch, wantSkipped)
	}
	l, err := s.ListQueue(ctx, store.QueueFilter{})
	must(t, err)
	if got, want := namesOf(l.Entries), []string{"D a", "D c", "D e", "D d", "R s@x", "R y@x", "R z@x"}; !slices.Equal(got, want) {
		t.Errorf("after remove %v, want %v", got, want)
	}
	// The other recipient of the message keeps it.
	y, err := s.QueueEntry(ctx, f.ref(t, "R y@x"))
	must(t, err)
	if string(y.Content) != "message xy" {
		t.Errorf("recipient y's message %q", y.Content)
	}
	// Removing the last recipient removes the message (nothing left for
	// Purge, which deletes orphaned messages).
	ch, err = s.RemoveQueued(ctx, []store.QueueRef{f.ref(t, "R y@x")})
	must(t, err)
	if ch.Changed != 1 {
		t.Errorf("remove y: %+v", ch)
	}
	if n, err := s.Purge(ctx, time.UnixMilli(1), time.UnixMilli(1)); err != nil || n != 0 {
		t.Errorf("purge after removing a message's recipients: %d %v, want nothing", n, err)
	}
	// No report, no status: nothing new queued, no status for the device.
	st, err := s.Stats(ctx)
	must(t, err)
	if st.Deliveries[store.DeliveryQueued] != 1 || st.Relays[store.RelayQueued] != 1 {
		t.Errorf("stats after remove %+v", st)
	}
	if _, err := s.DeliveryStatus(ctx, 10, "b"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("status of a removed delivery: %v", err)
	}
	// The claims were not disturbed; the removed delivery is never claimed.
	f.finish(t, s)
	if _, err := s.ClaimDelivery(ctx, 10, t0.Add(2*time.Hour), store.Limits{}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("claim after remove: %v", err)
	}
	if ch, err := s.RemoveQueued(ctx, nil); err != nil || ch.Changed != 0 || len(ch.Skipped) != 0 {
		t.Errorf("remove nothing: %+v %v", ch, err)
	}
	if _, err := s.RemoveQueued(ctx, []store.QueueRef{{Kind: "bogus", ID: 1}}); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("remove of a bogus kind: %v", err)
	}
}

// testQueueRemoveRace: a server delivers a device's queue while the
// operator removes its entries one by one: every entry ends exactly one
// way, removed or delivered, never both.
func testQueueRemoveRace(t *testing.T, s store.Store) {
	ctx := context.Background()
	const n = 40
	var ds []store.NewDelivery
	for i := range n {
		ds = append(ds, delivery(10, fmt.Sprint("m", i), t0))
	}
	must(t, s.Enqueue(ctx, store.Work{Deliveries: ds}))
	l, err := s.ListQueue(ctx, store.QueueFilter{Device: 10})
	must(t, err)
	if len(l.Entries) != n {
		t.Fatalf("listed %d of %d", len(l.Entries), n)
	}
	var mu sync.Mutex
	ended := map[int64]int{}
	end := func(id int64) {
		mu.Lock()
		ended[id]++
		mu.Unlock()
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for !t.Failed() {
			c, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
			if errors.Is(err, store.ErrNotFound) {
				return
			}
			if err != nil {
				t.Error(err)
				return
			}
			if err := s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}); err != nil {
				t.Error(err)
				return
			}
			end(c.ID)
		}
	})
	wg.Go(func() {
		// From the back of the queue, so that the two meet in the middle.
		for _, e := range slices.Backward(l.Entries) {
			ch, err := s.RemoveQueued(ctx, []store.QueueRef{e.Ref})
			if err != nil {
				t.Error(err)
				return
			}
			if ch.Changed == 1 {
				end(e.Ref.ID)
			}
		}
	})
	wg.Wait()
	if len(ended) != n {
		t.Errorf("%d entries ended, want %d", len(ended), n)
	}
	for id, k := range ended {
		if k != 1 {
			t.Errorf("entry %d ended %d times", id, k)
		}
	}
}
