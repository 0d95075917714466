package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

func delivery(addr uint32, id string, next time.Time) store.NewDelivery {
	return store.NewDelivery{Device: addr, MessageID: id, ContentType: 32, Content: []byte("content " + id),
		Priority: 1, NextAttempt: next, Expires: next.Add(time.Hour)}
}

func testSubmissions(t *testing.T, s store.Store) {
	ctx := context.Background()
	sub := &store.Submission{Device: 198036, InstanceID: 7, ContentHash: []byte("h1"), ContentType: 32,
		Content: []byte("ipm"), Received: t0}
	a, dup, err := s.AddSubmission(ctx, sub, t0.Add(-time.Hour))
	must(t, err)
	if dup || a.ID == 0 || a.State != store.SubmissionPending || a.Number == 0 || !bytes.Equal(a.Content, []byte("ipm")) {
		t.Fatalf("first submission: dup=%v %+v", dup, a)
	}
	// The same (device, instance id, hash) inside the window is the same
	// submission: an ESRO re-invocation never makes two messages.
	again := *sub
	again.Received = t0.Add(10 * time.Second)
	b, dup, err := s.AddSubmission(ctx, &again, t0.Add(-time.Hour))
	must(t, err)
	if !dup || b.ID != a.ID || b.Number != a.Number || b.LocalTime != a.LocalTime {
		t.Errorf("re-invocation: dup=%v %+v", dup, b)
	}
	for _, tc := range []struct {
		name  string
		mod   func(*store.Submission)
		since time.Time
	}{
		{"other instance id", func(s *store.Submission) { s.InstanceID = 8 }, t0.Add(-time.Hour)},
		{"other content", func(s *store.Submission) { s.ContentHash = []byte("h2") }, t0.Add(-time.Hour)},
		{"other device", func(s *store.Submission) { s.Device = 198037 }, t0.Add(-time.Hour)},
		{"outside the window", func(*store.Submission) {}, t0.Add(time.Second)},
	} {
		c := *sub
		c.Received = t0.Add(20 * time.Second)
		tc.mod(&c)
		r, dup, err := s.AddSubmission(ctx, &c, tc.since)
		must(t, err)
		if dup || r.ID == a.ID || (r.LocalTime == a.LocalTime && r.Number == a.Number) {
			t.Errorf("%s: dup=%v id=%d number=%d", tc.name, dup, r.ID, r.Number)
		}
	}
	_, _, err = s.AddSubmission(ctx, &store.Submission{Device: 1, ContentHash: []byte{1}}, t0)
	wantErr(t, err, store.ErrInvalid)

	pend, err := s.PendingSubmissions(ctx, t0.Add(time.Minute))
	must(t, err)
	if len(pend) != 5 || pend[0].ID != a.ID {
		t.Fatalf("pending: %d", len(pend))
	}
	if p, _ := s.PendingSubmissions(ctx, t0); len(p) != 0 {
		t.Errorf("pending before t0: %d", len(p))
	}

	work := store.Work{
		Deliveries: []store.NewDelivery{delivery(198037, "L:1", t0)},
		Relays: []store.NewRelay{{From: "198.036@example.net", Message: []byte("mail"), NextAttempt: t0,
			Expires: t0.Add(time.Hour), Recipients: []store.RelayRecipient{{Addr: "x@example.com"}}}},
	}
	ok, err := s.ReleaseSubmission(ctx, a.ID, "confirmed", work)
	must(t, err)
	if !ok {
		t.Fatal("release of a pending submission refused")
	}
	ok, err = s.ReleaseSubmission(ctx, a.ID, "confirmed", work)
	must(t, err)
	if ok {
		t.Error("second release accepted")
	}
	st, err := s.Stats(ctx)
	must(t, err)
	if st.Deliveries[store.DeliveryQueued] != 1 || st.Relays[store.RelayQueued] != 1 {
		t.Errorf("work queued by release (twice): %+v", st)
	}
	ok, err = s.DropSubmission(ctx, a.ID, "drop")
	must(t, err)
	if ok {
		t.Error("drop of a released submission")
	}
	ok, err = s.DropSubmission(ctx, pend[1].ID, "drop")
	must(t, err)
	if !ok {
		t.Error("drop of a pending submission refused")
	}
	_, err = s.ReleaseSubmission(ctx, 987654, "", store.Work{})
	wantErr(t, err, store.ErrNotFound)
	// Invalid work aborts the release as a whole.
	_, err = s.ReleaseSubmission(ctx, pend[2].ID, "", store.Work{Deliveries: []store.NewDelivery{{Device: 5}}})
	wantErr(t, err, store.ErrInvalid)
	pend, _ = s.PendingSubmissions(ctx, t0.Add(time.Minute))
	if len(pend) != 3 {
		t.Errorf("pending after release/drop: %d, want 3", len(pend))
	}
	// A dedupe hit reports the current state.
	b, dup, err = s.AddSubmission(ctx, &again, t0.Add(-time.Hour))
	must(t, err)
	if !dup || b.State != store.SubmissionReleased || b.Verify != "confirmed" {
		t.Errorf("dedupe after release: %+v", b)
	}
}

func testDeliveries(t *testing.T, s store.Store) {
	ctx := context.Background()
	st := uint32(12345)
	d1 := delivery(10, "L:a", t0)
	d1.SubmissionTime = &st
	d1.Report = store.Report{Device: 20, Mail: "x@y", Flags: 0x20, Recipient: "010.000", MessageID: "L:a",
		Headers: []byte("Subject: x\r\n"), DSN: "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@x"}
	d2 := delivery(10, "R:<b@x>", t0.Add(time.Minute))
	d3 := delivery(11, "R:<c@x>", t0)
	must(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{d1, d2, d3}}))
	wantErr(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: 10, MessageID: "x"}}}), store.ErrInvalid)

	due := dueDevices(t, s, t0)
	if !slices.Equal(due, []uint32{10, 11}) {
		t.Errorf("due devices %v", due)
	}
	next, ok, err := s.NextDue(ctx, t0)
	must(t, err)
	if !ok || !next.Equal(t0.Add(time.Minute)) {
		t.Errorf("next due after t0: %v %v", next, ok)
	}

	c, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
	must(t, err)
	if c.MessageID != "L:a" || c.State != store.DeliveryInFlight || c.Attempts != 1 || c.SubmissionTime == nil ||
		*c.SubmissionTime != st || c.Report.Device != 20 || c.Report.Mail != "x@y" || c.Report.Flags != 0x20 ||
		c.Report.Recipient != "010.000" || string(c.Report.Headers) != "Subject: x\r\n" || string(c.Content) != "content L:a" ||
		!c.Expires.Equal(t0.Add(time.Hour)) {
		t.Errorf("claimed %+v", c)
	}
	_, err = s.ClaimDelivery(ctx, 10, t0.Add(time.Hour), store.Limits{})
	wantErr(t, err, store.ErrBusy)

	// Respool: attempt counted, due later.
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryQueued,
		NextAttempt: t0.Add(10 * time.Minute), Error: "failure"}))
	wantErr(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}), store.ErrConflict)
	wantErr(t, s.FinishDelivery(ctx, 999999, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}), store.ErrNotFound)
	_, err = s.ClaimDelivery(ctx, 10, t0, store.Limits{})
	wantErr(t, err, store.ErrNotFound)

	// A wake makes both due now; FIFO order by queueing.
	n, err := s.WakeDevice(ctx, 10, t0.Add(time.Second))
	must(t, err)
	if n != 2 {
		t.Errorf("woken %d, want 2", n)
	}
	c, err = s.ClaimDelivery(ctx, 10, t0.Add(time.Second), store.Limits{})
	must(t, err)
	if c.MessageID != "L:a" || c.Attempts != 2 || c.LastError != "failure" {
		t.Errorf("after wake claimed %+v", c)
	}
	// Delivered, with a status and a follow-up report in one transaction.
	report := delivery(20, "L:report", t0)
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered,
		Status: 2, Work: store.Work{Deliveries: []store.NewDelivery{report}}}))
	if got, err := s.DeliveryStatus(ctx, 10, "L:a"); err != nil || got != 2 {
		t.Errorf("status %d %v", got, err)
	}
	_, err = s.DeliveryStatus(ctx, 11, "L:a")
	wantErr(t, err, store.ErrNotFound)
	if c, err := s.ClaimDelivery(ctx, 20, t0, store.Limits{}); err != nil || c.MessageID != "L:report" {
		t.Errorf("report delivery: %v %v", c, err)
	}

	// Requeue undoes the attempt (the attempt never reached the device).
	c, err = s.ClaimDelivery(ctx, 10, t0.Add(time.Second), store.Limits{})
	must(t, err)
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryQueued,
		NextAttempt: t0, Requeue: true}))
	c, err = s.ClaimDelivery(ctx, 10, t0.Add(time.Second), store.Limits{})
	must(t, err)
	if c.Attempts != 1 {
		t.Errorf("attempts after requeue: %d, want 1", c.Attempts)
	}
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryFailed,
		Status: 3, Error: "permanent"}))
	if got, _ := s.DeliveryStatus(ctx, 10, "R:<b@x>"); got != 3 {
		t.Errorf("status after failure %d", got)
	}

	// Expiry lists queued deliveries only; expiring one goes from queued.
	exp, err := s.ExpiredDeliveries(ctx, t0.Add(2*time.Hour), 10)
	must(t, err)
	if len(exp) != 1 || exp[0].MessageID != "R:<c@x>" {
		t.Fatalf("expired %+v", exp)
	}
	must(t, s.FinishDelivery(ctx, exp[0].ID, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryFailed, Status: 3}))
	if exp, _ := s.ExpiredDeliveries(ctx, t0.Add(2*time.Hour), 10); len(exp) != 0 {
		t.Errorf("expired after finishing: %d", len(exp))
	}
	if _, ok, _ := s.NextDue(ctx, t0); ok {
		t.Error("NextDue with nothing queued")
	}
	wantErr(t, s.FinishDelivery(ctx, exp0(exp), store.DeliveryQueued, store.DeliveryResult{State: "bogus"}), store.ErrInvalid)
}

func exp0(d []*store.Delivery) int64 {
	if len(d) == 0 {
		return 1
	}
	return d[0].ID
}

func testDeliveryLimits(t *testing.T, s store.Store) {
	ctx := context.Background()
	big := delivery(10, "big", t0)
	big.Content = bytes.Repeat([]byte{1}, 500)
	low := delivery(10, "low", t0)
	low.Priority = 0
	urgent := delivery(10, "urgent", t0)
	urgent.Priority = 2
	urgent.ContentType = 2
	must(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{big, low, urgent}}))
	info, err := s.QueuedDeliveries(ctx, 10)
	must(t, err)
	if len(info) != 3 || info[0].Length != 500 || info[1].Priority != 0 || info[2].ContentType != 2 {
		t.Errorf("queued info %+v", info)
	}
	max, prio := uint32(100), uint8(1)
	c, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{MaxContentLength: &max, LowestPriority: &prio})
	must(t, err)
	if c.MessageID != "urgent" {
		t.Errorf("claimed %s within limits, want urgent", c.MessageID)
	}
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	_, err = s.ClaimDelivery(ctx, 10, t0, store.Limits{MaxContentLength: &max, LowestPriority: &prio})
	wantErr(t, err, store.ErrNotFound)
	c, err = s.ClaimDelivery(ctx, 10, t0, store.Limits{MaxContentLength: &max})
	must(t, err)
	if c.MessageID != "low" {
		t.Errorf("claimed %s, want low", c.MessageID)
	}
}

// testConcurrentClaims: many goroutines claiming for one device never get
// two deliveries in flight at once.
func testConcurrentClaims(t *testing.T, s store.Store) {
	ctx := context.Background()
	var ds []store.NewDelivery
	for i := range 20 {
		ds = append(ds, delivery(10, fmt.Sprint("m", i), t0))
	}
	must(t, s.Enqueue(ctx, store.Work{Deliveries: ds}))
	var mu sync.Mutex
	inFlight, delivered := 0, map[string]bool{}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				c, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
				if errors.Is(err, store.ErrBusy) {
					continue
				}
				if errors.Is(err, store.ErrNotFound) {
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				// Held from the claim until just before finishing: another
				// claim can only succeed after the finish commits.
				mu.Lock()
				inFlight++
				if inFlight > 1 || delivered[c.MessageID] {
					t.Errorf("in flight %d, %s delivered before", inFlight, c.MessageID)
				}
				delivered[c.MessageID] = true
				mu.Unlock()
				runtime.Gosched()
				mu.Lock()
				inFlight--
				mu.Unlock()
				if err := s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if len(delivered) != 20 {
		t.Errorf("delivered %d of 20", len(delivered))
	}
}

// testQueuedDevices: the scheduler's rebuild (all devices with queued
// deliveries) and its incremental rescan (only rows changed since).
func testQueuedDevices(t *testing.T, s store.Store) {
	ctx := context.Background()
	if ds, err := s.QueuedDevices(ctx, time.Time{}); err != nil || len(ds) != 0 {
		t.Fatalf("empty store: %v %v", ds, err)
	}
	must(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{
		delivery(10, "a", t0.Add(time.Minute)), delivery(10, "b", t0), delivery(11, "c", t0.Add(2*time.Hour))}}))
	ds, err := s.QueuedDevices(ctx, time.Time{})
	must(t, err)
	want := []store.DeviceDue{{Device: 10, Next: t0}, {Device: 11, Next: t0.Add(2 * time.Hour)}}
	if !slices.EqualFunc(ds, want, func(a, b store.DeviceDue) bool { return a.Device == b.Device && a.Next.Equal(b.Next) }) {
		t.Errorf("queued devices %v, want %v", ds, want)
	}
	if next, ok, err := s.DeviceNextDue(ctx, 10); err != nil || !ok || !next.Equal(t0) {
		t.Errorf("device 10 next due %v %v %v", next, ok, err)
	}
	if _, ok, err := s.DeviceNextDue(ctx, 12); err != nil || ok {
		t.Errorf("device 12 next due %v %v", ok, err)
	}

	time.Sleep(5 * time.Millisecond) // times are stored in milliseconds
	mark := time.Now()
	if ds, err := s.QueuedDevices(ctx, mark); err != nil || len(ds) != 0 {
		t.Errorf("nothing changed since the mark: %v %v", ds, err)
	}
	c, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
	must(t, err)
	if c.MessageID != "b" {
		t.Fatalf("claimed %q", c.MessageID)
	}
	if ds, err := s.QueuedDevices(ctx, mark); err != nil || len(ds) != 0 {
		t.Errorf("an in-flight delivery is not queued: %v %v", ds, err)
	}
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryQueued,
		NextAttempt: t0.Add(3 * time.Hour)}))
	ds, err = s.QueuedDevices(ctx, mark)
	must(t, err)
	if len(ds) != 1 || ds[0].Device != 10 || !ds[0].Next.Equal(t0.Add(3*time.Hour)) {
		t.Errorf("changed since the mark: %v, want device 10 at +3h only", ds)
	}
	if next, ok, _ := s.DeviceNextDue(ctx, 10); !ok || !next.Equal(t0.Add(time.Minute)) {
		t.Errorf("device 10 next due after the respool: %v %v", next, ok)
	}
	c, err = s.ClaimDelivery(ctx, 11, t0.Add(2*time.Hour), store.Limits{})
	must(t, err)
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	if _, ok, _ := s.DeviceNextDue(ctx, 11); ok {
		t.Error("device 11 has nothing queued after its delivery")
	}
	ds, err = s.QueuedDevices(ctx, time.Time{})
	must(t, err)
	if len(ds) != 1 || ds[0].Device != 10 || !ds[0].Next.Equal(t0.Add(time.Minute)) {
		t.Errorf("queued devices at the end %v", ds)
	}
}

// testDeliveryContact: ClaimDelivery and PeekDelivery return the device's
// contact with its delivery (zero when never heard, or for a device not
// registered), and QueuedDevices when each device was last heard from.
func testDeliveryContact(t *testing.T, s store.Store) {
	ctx := context.Background()
	must(t, s.AddDevice(ctx, dev(20, "127.0.0.20")))
	must(t, s.AddDevice(ctx, dev(21, "127.0.0.21")))
	must(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{
		delivery(20, "a", t0), delivery(20, "b", t0), delivery(21, "c", t0), delivery(22, "d", t0)}}))
	heard := func() map[uint32]time.Time {
		t.Helper()
		ds, err := s.QueuedDevices(ctx, time.Time{})
		must(t, err)
		m := map[uint32]time.Time{}
		for _, d := range ds {
			m[d.Device] = d.Heard
		}
		return m
	}
	if h := heard(); len(h) != 3 || !h[20].IsZero() || !h[21].IsZero() || !h[22].IsZero() {
		t.Errorf("never heard: %v", h)
	}
	d, err := s.ClaimDelivery(ctx, 20, t0, store.Limits{})
	must(t, err)
	if d.MessageID != "a" || d.Contact != (store.Contact{}) {
		t.Errorf("claim of a device never heard: %q %+v", d.MessageID, d.Contact)
	}
	must(t, s.FinishDelivery(ctx, d.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))

	c := store.Contact{Addr: netip.MustParseAddrPort("192.0.2.20:4000"), Via: "mts-a 127.0.0.1:641", At: t0.Add(-time.Minute), Polled: true}
	_, _, err = s.SetContact(ctx, 20, c)
	must(t, err)
	same := func(got store.Contact) bool {
		return got.Addr == c.Addr && got.Via == c.Via && got.At.Equal(c.At) && got.Polled == c.Polled
	}
	if h := heard(); !h[20].Equal(c.At) || !h[21].IsZero() {
		t.Errorf("heard after SetContact: %v", h)
	}
	if ds, err := s.QueuedDevices(ctx, time.Now().Add(-time.Hour)); err != nil || len(ds) == 0 {
		t.Errorf("rescan: %v %v", ds, err)
	} else if ds[0].Device != 20 || !ds[0].Heard.Equal(c.At) {
		t.Errorf("rescan: %+v", ds[0])
	}
	p, err := s.PeekDelivery(ctx, 20, t0, store.Limits{})
	must(t, err)
	if p.MessageID != "b" || !same(p.Contact) {
		t.Errorf("peek: %q %+v, want contact %+v", p.MessageID, p.Contact, c)
	}
	d, err = s.ClaimDelivery(ctx, 20, t0, store.Limits{})
	must(t, err)
	if d.MessageID != "b" || !same(d.Contact) {
		t.Errorf("claim: %q %+v, want contact %+v", d.MessageID, d.Contact, c)
	}
	// A device not registered (removed since its mail was queued): the
	// delivery comes, with no contact.
	d, err = s.ClaimDelivery(ctx, 22, t0, store.Limits{})
	must(t, err)
	if d.MessageID != "d" || d.Contact != (store.Contact{}) {
		t.Errorf("claim for a device not registered: %q %+v", d.MessageID, d.Contact)
	}
	p, err = s.PeekDelivery(ctx, 21, t0, store.Limits{})
	must(t, err)
	if p.MessageID != "c" || p.Contact != (store.Contact{}) {
		t.Errorf("peek of a device never heard: %q %+v", p.MessageID, p.Contact)
	}
}

// dueDevices lists the devices with a queued delivery due at now, in
// address order, from QueuedDevices.
func dueDevices(t *testing.T, s store.Store, now time.Time) []uint32 {
	t.Helper()
	ds, err := s.QueuedDevices(context.Background(), time.Time{})
	must(t, err)
	var out []uint32
	for _, d := range ds {
		if !d.Next.After(now) {
			out = append(out, d.Device)
		}
	}
	return out
}
