// Package storetest is the conformance suite every store.Store backend
// runs: registry, counters, submissions with dedupe, the delivery and relay
// queue state machines (with a randomised model check), the operator's
// queue methods and maintenance.
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

// Open returns a fresh, empty store; the suite closes it.
type Open func(t *testing.T) store.Store

// Run runs every conformance test against stores made by open.
func Run(t *testing.T, open Open) {
	for _, tc := range []struct {
		name string
		f    func(*testing.T, store.Store)
	}{
		{"Registry", testRegistry},
		{"Contacts", testContacts},
		{"RegistryChanges", testRegistryChanges},
		{"InstanceIDs", testInstanceIDs},
		{"MessageNumbers", testMessageNumbers},
		{"Submissions", testSubmissions},
		{"Deliveries", testDeliveries},
		{"DeliveryLimits", testDeliveryLimits},
		{"QueuedDevices", testQueuedDevices},
		{"DeliveryContact", testDeliveryContact},
		{"ImportDevices", testImportDevices},
		{"Relays", testRelays},
		{"RecoverPurgeStats", testRecoverPurgeStats},
		{"ConcurrentClaims", testConcurrentClaims},
		{"DeliveryModel", testDeliveryModel},
		{"RelayModel", testRelayModel},
		{"QueueList", testQueueList},
		{"QueueRetry", testQueueRetry},
		{"QueueRetryForce", testQueueRetryForce},
		{"QueueRemove", testQueueRemove},
		{"QueueRemoveRace", testQueueRemoveRace},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			defer s.Close()
			tc.f(t, s)
		})
	}
}

// T0 is the suite's reference time; queue times are relative to it.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func dev(addr uint32, ip string, aliases ...string) *store.Device {
	return &store.Device{Address: addr, IP: netip.MustParseAddr(ip), Port: 641, Version: "1.1",
		Mode: store.ModeComplete, Aliases: aliases}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantErr(t *testing.T, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error %v, want %v", err, target)
	}
}

// testContacts: a device's contact is recorded apart from the registry
// (no registry version change, kept by UpdateDevice), an older contact
// never overwrites a newer one, and a device may be registered without an
// IP address when it has a password.
func testContacts(t *testing.T, s store.Store) {
	ctx := context.Background()
	d := dev(198036, "127.0.0.11")
	d.PasswordHash = "hash"
	must(t, s.AddDevice(ctx, d))
	c, err := s.DeviceContact(ctx, 198036)
	must(t, err)
	if c.Known() || c != (store.Contact{}) {
		t.Errorf("contact of a device never heard: %+v", c)
	}
	v0, err := s.RegistryVersion(ctx)
	must(t, err)
	c1 := store.Contact{Addr: netip.MustParseAddrPort("192.0.2.7:27999"), Via: "mts-a 127.0.0.1:641", At: t0, Polled: true}
	prev, written, err := s.SetContact(ctx, 198036, c1)
	must(t, err)
	if prev.Known() || !written {
		t.Errorf("first contact: prev %+v written %v", prev, written)
	}
	if got, err := s.DeviceContact(ctx, 198036); err != nil || got.Addr != c1.Addr || got.Via != c1.Via || !got.At.Equal(t0) || !got.Polled {
		t.Errorf("contact round trip: %+v %v", got, err)
	}
	if v, _ := s.RegistryVersion(ctx); v != v0 {
		t.Error("SetContact changed the registry version")
	}
	// The same address later: refreshed; the previous one is returned.
	c1.At = t0.Add(time.Minute)
	prev, written, err = s.SetContact(ctx, 198036, c1)
	must(t, err)
	if prev.Addr != c1.Addr || prev.Via != c1.Via || !prev.At.Equal(t0) || !prev.Polled || !written {
		t.Errorf("refresh: prev %+v written %v", prev, written)
	}
	// A sign of life moves the time of that very contact only.
	ok, err := s.TouchContact(ctx, 198036, c1, t0.Add(70*time.Second))
	must(t, err)
	if !ok {
		t.Error("TouchContact of the current contact did nothing")
	}
	other := store.Contact{Addr: netip.MustParseAddrPort("192.0.2.7:1"), Via: c1.Via}
	if ok, err := s.TouchContact(ctx, 198036, other, t0.Add(80*time.Second)); err != nil || ok {
		t.Errorf("TouchContact of another address: %v %v", ok, err)
	}
	if ok, err := s.TouchContact(ctx, 198036, c1, t0.Add(10*time.Second)); err != nil || ok {
		t.Errorf("TouchContact back in time: %v %v", ok, err)
	}
	if got, _ := s.DeviceContact(ctx, 198036); !got.At.Equal(t0.Add(70 * time.Second)) {
		t.Errorf("contact time after touches: %v", got.At)
	}
	// Another server heard it.
	c2 := store.Contact{Addr: c1.Addr, Via: "mts-b 127.0.0.1:641", At: t0.Add(2 * time.Minute)}
	_, _, err = s.SetContact(ctx, 198036, c2)
	must(t, err)
	// An older contact (a slower server's write) loses.
	old := store.Contact{Addr: netip.MustParseAddrPort("[2001:db8::1]:5"), Via: "mts-a 127.0.0.1:641", At: t0.Add(90 * time.Second)}
	prev, written, err = s.SetContact(ctx, 198036, old)
	must(t, err)
	if prev.Via != c2.Via || written {
		t.Errorf("older contact: prev %+v written %v", prev, written)
	}
	// Registry edits keep the contact; Device and Devices show it.
	up := dev(198036, "127.0.0.12")
	up.PasswordHash = "hash2"
	must(t, s.UpdateDevice(ctx, up))
	got, err := s.Device(ctx, 198036)
	must(t, err)
	if got.Contact.Addr != c2.Addr || got.Contact.Via != c2.Via || !got.Contact.At.Equal(c2.At) || got.Contact.Polled {
		t.Errorf("contact after UpdateDevice: %+v", got.Contact)
	}
	list, err := s.Devices(ctx)
	must(t, err)
	if len(list) != 1 || list[0].Contact.Addr != c2.Addr {
		t.Errorf("Devices: %+v", list)
	}
	_, _, err = s.SetContact(ctx, 5, c2)
	wantErr(t, err, store.ErrNotFound)
	_, err = s.DeviceContact(ctx, 5)
	wantErr(t, err, store.ErrNotFound)
	_, _, err = s.SetContact(ctx, 198036, store.Contact{At: t0.Add(time.Hour)})
	wantErr(t, err, store.ErrInvalid)

	// No IP address: allowed with a password, and kept as none.
	nat := &store.Device{Address: 198037, PasswordHash: "hash", Version: "1.1", Mode: store.ModeComplete}
	must(t, s.AddDevice(ctx, nat))
	got, err = s.Device(ctx, 198037)
	must(t, err)
	if got.IP.IsValid() || got.Port != 0 || got.Contact.Known() {
		t.Errorf("device without IP: %+v", got)
	}
	nat.PasswordHash = ""
	wantErr(t, s.UpdateDevice(ctx, nat), store.ErrInvalid)
}

func testRegistry(t *testing.T, s store.Store) {
	ctx := context.Background()
	v0, err := s.RegistryVersion(ctx)
	must(t, err)
	d := dev(198036, "127.0.0.11", "Alice@Example.NET", "alice@example.net")
	d.PasswordHash, d.Mode, d.Version = "hash", store.ModeEfficient, "1.0"
	must(t, s.AddDevice(ctx, d))
	v1, err := s.RegistryVersion(ctx)
	must(t, err)
	if v1 == v0 {
		t.Error("registry version unchanged by AddDevice")
	}
	got, err := s.Device(ctx, 198036)
	must(t, err)
	if got.PasswordHash != "hash" || got.IP != d.IP || got.Port != 641 || got.Version != "1.0" ||
		got.Mode != store.ModeEfficient || !slices.Equal(got.Aliases, []string{"alice@example.net"}) {
		t.Errorf("device round trip: %+v", got)
	}
	if got.Created.IsZero() || got.Updated.IsZero() {
		t.Error("created/updated not set")
	}
	for _, tc := range []struct {
		name string
		d    *store.Device
		want error
	}{
		{"same address", dev(198036, "127.0.0.12"), store.ErrExists},
		{"alias taken", dev(198037, "127.0.0.12", "ALICE@example.net"), store.ErrExists},
		{"address 0", dev(0, "127.0.0.12"), store.ErrInvalid},
		{"no IP", &store.Device{Address: 5, Version: "1.1", Mode: store.ModeComplete}, store.ErrInvalid},
		{"bad mode", &store.Device{Address: 5, IP: netip.MustParseAddr("::1"), Version: "1.1", Mode: "x"}, store.ErrInvalid},
	} {
		wantErr(t, s.AddDevice(ctx, tc.d), tc.want)
	}
	// A failed add leaves nothing behind.
	if _, err := s.Device(ctx, 198037); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("device of a failed add: %v", err)
	}
	must(t, s.AddDevice(ctx, dev(198037, "127.0.0.12", "bob@example.net")))
	list, err := s.Devices(ctx)
	must(t, err)
	if len(list) != 2 || list[0].Address != 198036 || list[1].Address != 198037 ||
		!slices.Equal(list[1].Aliases, []string{"bob@example.net"}) {
		t.Errorf("Devices: %+v", list)
	}

	// Update replaces the registry fields and aliases, not delivery control.
	lim := uint32(100)
	must(t, s.SetDeliveryControl(ctx, 198037, store.DeliveryControl{MaxContentLength: &lim}))
	up := dev(198037, "10.0.0.1", "b@example.net", "bob2@example.net")
	up.Port = 2002
	must(t, s.UpdateDevice(ctx, up))
	got, err = s.Device(ctx, 198037)
	must(t, err)
	if got.IP != up.IP || got.Port != 2002 || !slices.Equal(got.Aliases, []string{"b@example.net", "bob2@example.net"}) ||
		got.Control.MaxContentLength == nil || *got.Control.MaxContentLength != 100 {
		t.Errorf("after update: %+v", got)
	}
	wantErr(t, s.UpdateDevice(ctx, dev(5, "10.0.0.1")), store.ErrNotFound)
	wantErr(t, s.UpdateDevice(ctx, dev(198037, "10.0.0.1", "alice@example.net")), store.ErrExists)

	ops, prio := uint64(1)<<35|1<<63, uint8(2)
	must(t, s.SetDeliveryControl(ctx, 198036, store.DeliveryControl{Operations: &ops, LowestPriority: &prio}))
	got, err = s.Device(ctx, 198036)
	must(t, err)
	if got.Control.Operations == nil || *got.Control.Operations != ops || got.Control.LowestPriority == nil ||
		*got.Control.LowestPriority != 2 || got.Control.MaxContentLength != nil {
		t.Errorf("delivery control round trip: %+v", got.Control)
	}
	must(t, s.SetDeliveryControl(ctx, 198036, store.DeliveryControl{}))
	got, _ = s.Device(ctx, 198036)
	if got.Control != (store.DeliveryControl{}) {
		t.Errorf("cleared delivery control: %+v", got.Control)
	}
	wantErr(t, s.SetDeliveryControl(ctx, 7, store.DeliveryControl{}), store.ErrNotFound)

	// DTLS keys: set, rotated, required, cleared; a short key is refused.
	key := []byte("0123456789abcdef0123")
	up.PSK, up.RequireDTLS = key, true
	must(t, s.UpdateDevice(ctx, up))
	got, _ = s.Device(ctx, 198037)
	if !slices.Equal(got.PSK, key) || !got.RequireDTLS {
		t.Errorf("DTLS key round trip: psk %d bytes, require %v", len(got.PSK), got.RequireDTLS)
	}
	up.PSK = []byte("fedcba9876543210")
	must(t, s.UpdateDevice(ctx, up))
	if got, _ = s.Device(ctx, 198037); !slices.Equal(got.PSK, up.PSK) {
		t.Error("rotated DTLS key not stored")
	}
	up.PSK, up.RequireDTLS = nil, false
	must(t, s.UpdateDevice(ctx, up))
	if got, _ = s.Device(ctx, 198037); got.PSK != nil || got.RequireDTLS {
		t.Errorf("cleared DTLS key: %d bytes, require %v", len(got.PSK), got.RequireDTLS)
	}
	short := dev(198039, "127.0.0.14")
	short.PSK = []byte("short")
	wantErr(t, s.AddDevice(ctx, short), store.ErrInvalid)
	withKey := dev(198039, "127.0.0.14")
	withKey.PSK = key
	must(t, s.AddDevice(ctx, withKey))
	if got, _ = s.Device(ctx, 198039); !slices.Equal(got.PSK, key) || got.RequireDTLS {
		t.Errorf("added DTLS key: %d bytes", len(got.PSK))
	}
	must(t, s.RemoveDevice(ctx, 198039))

	must(t, s.RemoveDevice(ctx, 198036))
	wantErr(t, s.RemoveDevice(ctx, 198036), store.ErrNotFound)
	_, err = s.Device(ctx, 198036)
	wantErr(t, err, store.ErrNotFound)
	// The alias is free again.
	must(t, s.AddDevice(ctx, dev(198038, "127.0.0.13", "alice@example.net")))
}

func testRegistryChanges(t *testing.T, s store.Store) {
	ctx := context.Background()
	changes := func(since int64) (int64, []uint32) {
		t.Helper()
		v, addrs, ok, err := s.RegistryChanges(ctx, since)
		must(t, err)
		if !ok {
			t.Fatalf("changes since %d: not held", since)
		}
		return v, addrs
	}
	v0, err := s.RegistryVersion(ctx)
	must(t, err)
	if v, addrs := changes(v0); v != v0 || len(addrs) != 0 {
		t.Fatalf("changes since the current version %d: version %d, %v", v0, v, addrs)
	}
	must(t, s.AddDevice(ctx, dev(7, "127.0.0.7")))
	v1, addrs := changes(v0)
	if !slices.Equal(addrs, []uint32{7}) {
		t.Errorf("after adding 7: %v", addrs)
	}
	must(t, s.AddDevice(ctx, dev(3, "127.0.0.3")))
	must(t, s.UpdateDevice(ctx, dev(7, "127.0.0.8")))
	must(t, s.RemoveDevice(ctx, 3))
	must(t, s.AddDevice(ctx, dev(9, "127.0.0.9")))
	must(t, s.SetDeliveryControl(ctx, 9, store.DeliveryControl{}))
	v2, addrs := changes(v1)
	if !slices.Equal(addrs, []uint32{3, 7, 9}) {
		t.Errorf("changes since %d: %v, want 3 7 9 (each once, in order)", v1, addrs)
	}
	if cur, _ := s.RegistryVersion(ctx); v2 != cur {
		t.Errorf("changes up to version %d, current %d", v2, cur)
	}
	// An import logs its batch; a failed edit logs nothing.
	_, err = s.ImportDevices(ctx, []*store.Device{dev(12, "127.0.0.12"), dev(11, "127.0.0.11")}, false)
	must(t, err)
	wantErr(t, s.RemoveDevice(ctx, 3), store.ErrNotFound)
	wantErr(t, s.AddDevice(ctx, dev(7, "127.0.0.7")), store.ErrExists)
	if _, addrs = changes(v2); !slices.Equal(addrs, []uint32{11, 12}) {
		t.Errorf("changes since %d: %v, want 11 12", v2, addrs)
	}
	// A version the store never had: read the whole registry.
	if _, _, ok, err := s.RegistryChanges(ctx, v2+1000); err != nil || ok {
		t.Errorf("changes since a future version: ok %v, %v", ok, err)
	}
}

func testInstanceIDs(t *testing.T, s store.Store) {
	ctx := context.Background()
	must(t, s.AddDevice(ctx, dev(1, "127.0.0.1")))
	want := 0
	for _, n := range []int{1, 3, 100, 200, 1} {
		got, err := s.ReserveInstanceIDs(ctx, 1, n)
		must(t, err)
		if int(got) != want%256 {
			t.Fatalf("reserve %d: first %d, want %d", n, got, want%256)
		}
		want += n
	}
	_, err := s.ReserveInstanceIDs(ctx, 2, 1)
	wantErr(t, err, store.ErrNotFound)
	_, err = s.ReserveInstanceIDs(ctx, 1, 0)
	wantErr(t, err, store.ErrInvalid)

	// A claim reserves what Limits.InstanceIDs asks for, from the same
	// counter, in its own write; a count out of range undoes the claim.
	must(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{
		delivery(1, "L:a", t0), delivery(1, "L:b", t0), delivery(1, "L:c", t0)}}))
	var asked []string
	ids := func(n int) store.Limits {
		return store.Limits{InstanceIDs: func(d *store.Delivery) int {
			asked = append(asked, d.MessageID)
			return n
		}}
	}
	_, err = s.ClaimDelivery(ctx, 1, t0, ids(257))
	wantErr(t, err, store.ErrInvalid)
	c, err := s.ClaimDelivery(ctx, 1, t0, ids(3))
	must(t, err)
	if c.MessageID != "L:a" || c.Attempts != 1 || int(c.InstanceBase) != want%256 {
		t.Fatalf("claimed %s (attempt %d) with instance ids from %d, want L:a (1) from %d", c.MessageID, c.Attempts, c.InstanceBase, want%256)
	}
	want += 3
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	c, err = s.ClaimDelivery(ctx, 1, t0, ids(0)) // none needed: the counter stays
	must(t, err)
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	if got, err := s.ReserveInstanceIDs(ctx, 1, 1); err != nil || int(got) != want%256 {
		t.Fatalf("reserve after claims: first %d (%v), want %d", got, err, want%256)
	}
	if !slices.Equal(asked[len(asked)-2:], []string{"L:a", "L:b"}) || asked[0] != "L:a" {
		t.Errorf("asked for the instance ids of %v", asked)
	}
	want++

	// A peek takes nothing: the same delivery and ids twice; its outcome,
	// finished from queued, counts the attempt and reserves the ids.
	for range 2 {
		p, err := s.PeekDelivery(ctx, 1, t0, ids(2))
		must(t, err)
		if p.MessageID != "L:c" || p.State != store.DeliveryQueued || p.Attempts != 0 || int(p.InstanceBase) != want%256 {
			t.Fatalf("peeked %s (%s, attempt %d) with instance ids from %d, want L:c (queued, 0) from %d",
				p.MessageID, p.State, p.Attempts, p.InstanceBase, want%256)
		}
	}
	p, err := s.PeekDelivery(ctx, 1, t0, store.Limits{})
	must(t, err)
	must(t, s.FinishDelivery(ctx, p.ID, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryQueued,
		NextAttempt: t0, Attempted: true, InstanceIDs: 2}))
	want += 2
	c, err = s.ClaimDelivery(ctx, 1, t0, ids(1))
	must(t, err)
	if c.MessageID != "L:c" || c.Attempts != 2 || int(c.InstanceBase) != want%256 {
		t.Errorf("claimed %s (attempt %d) with instance ids from %d after a peeked attempt, want L:c (2) from %d",
			c.MessageID, c.Attempts, c.InstanceBase, want%256)
	}
	_, err = s.PeekDelivery(ctx, 1, t0, store.Limits{})
	wantErr(t, err, store.ErrBusy)
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	_, err = s.PeekDelivery(ctx, 1, t0, store.Limits{})
	wantErr(t, err, store.ErrNotFound)
}

func testMessageNumbers(t *testing.T, s store.Store) {
	ctx := context.Background()
	next := func(tm time.Time) uint32 {
		n, err := s.NextMessageNumber(ctx, tm)
		must(t, err)
		return n
	}
	for i := uint32(1); i <= 3; i++ {
		if n := next(t0); n != i {
			t.Fatalf("number %d, want %d", n, i)
		}
	}
	// A new day restarts at 1; a clock stepping back keeps counting.
	if n := next(t0.Add(24 * time.Hour)); n != 1 {
		t.Errorf("next day: %d, want 1", n)
	}
	if n := next(t0); n != 2 {
		t.Errorf("clock back: %d, want 2", n)
	}
	// Submissions share the counter.
	sub, _, err := s.AddSubmission(ctx, &store.Submission{Device: 1, ContentHash: []byte{1}, ContentType: 32,
		Content: []byte{0x30, 0}, Received: t0.Add(24 * time.Hour)}, t0)
	must(t, err)
	if sub.Number != 3 || sub.LocalTime != uint32(t0.Add(24*time.Hour).Unix()) {
		t.Errorf("submission id (%d, %d)", sub.LocalTime, sub.Number)
	}
}

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

func testRelays(t *testing.T, s store.Store) {
	ctx := context.Background()
	rep := store.Report{Device: 198036, Flags: 0x20, Recipient: "a@x", MessageID: "L:1"}
	must(t, s.Enqueue(ctx, store.Work{Relays: []store.NewRelay{
		{From: "198.036@e", Message: []byte("m1"), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x", Report: rep}, {Addr: "b@x"}}},
		{From: "", Message: []byte("dsn"), NextAttempt: t0.Add(time.Minute), Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "c@x"}}},
	}}))
	wantErr(t, s.Enqueue(ctx, store.Work{Relays: []store.NewRelay{{Expires: t0}}}), store.ErrInvalid)
	bs, err := s.ClaimRelays(ctx, t0, 10)
	must(t, err)
	if len(bs) != 1 || bs[0].From != "198.036@e" || string(bs[0].Message) != "m1" || len(bs[0].Recipients) != 2 {
		t.Fatalf("claimed %+v", bs)
	}
	a, b := bs[0].Recipients[0], bs[0].Recipients[1]
	if a.Addr != "a@x" || a.Report.Device != rep.Device || a.Report.Flags != rep.Flags || a.Report.Recipient != rep.Recipient || a.Report.MessageID != rep.MessageID || a.Attempts != 1 || a.State != store.RelaySending {
		t.Errorf("recipient %+v", a)
	}
	if again, _ := s.ClaimRelays(ctx, t0, 10); len(again) != 0 {
		t.Error("sending recipients claimed twice")
	}
	// A conflict rolls back the whole batch.
	err = s.FinishRelays(ctx, []store.RelayResult{
		{ID: a.ID, From: store.RelaySending, State: store.RelaySent},
		{ID: b.ID, From: store.RelayQueued, State: store.RelaySent},
	}, store.Work{})
	wantErr(t, err, store.ErrConflict)
	report := delivery(198036, "L:ndr", t0)
	must(t, s.FinishRelays(ctx, []store.RelayResult{
		{ID: a.ID, From: store.RelaySending, State: store.RelayFailed, Error: "550"},
		{ID: b.ID, From: store.RelaySending, State: store.RelayQueued, NextAttempt: t0.Add(30 * time.Minute), Error: "451"},
	}, store.Work{Deliveries: []store.NewDelivery{report}}))
	st, err := s.Stats(ctx)
	must(t, err)
	if st.Relays[store.RelayFailed] != 1 || st.Relays[store.RelayQueued] != 2 || st.Deliveries[store.DeliveryQueued] != 1 {
		t.Errorf("stats after finish %+v", st)
	}
	bs, err = s.ClaimRelays(ctx, t0.Add(time.Minute), 10)
	must(t, err)
	if len(bs) != 1 || string(bs[0].Message) != "dsn" || bs[0].From != "" {
		t.Fatalf("second claim %+v", bs)
	}
	must(t, s.FinishRelays(ctx, []store.RelayResult{{ID: bs[0].Recipients[0].ID, From: store.RelaySending,
		State: store.RelaySent}}, store.Work{}))
	// Expired recipients are not claimed but listed.
	if bs, _ := s.ClaimRelays(ctx, t0.Add(2*time.Hour), 10); len(bs) != 0 {
		t.Errorf("claimed expired relays %+v", bs)
	}
	exp, err := s.ExpiredRelays(ctx, t0.Add(2*time.Hour), 10)
	must(t, err)
	if len(exp) != 1 || len(exp[0].Recipients) != 1 || exp[0].Recipients[0].Addr != "b@x" ||
		exp[0].Recipients[0].LastError != "451" || string(exp[0].Message) != "m1" {
		t.Fatalf("expired %+v", exp)
	}
	must(t, s.FinishRelays(ctx, []store.RelayResult{{ID: b.ID, From: store.RelayQueued, State: store.RelayFailed}}, store.Work{}))
}

func testRecoverPurgeStats(t *testing.T, s store.Store) {
	ctx := context.Background()
	must(t, s.AddDevice(ctx, dev(10, "127.0.0.1")))
	must(t, s.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{delivery(10, "a", t0), delivery(10, "b", t0)},
		Relays: []store.NewRelay{{Message: []byte("m"), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x"}}}},
	}))
	c, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
	must(t, err)
	_, err = s.ClaimRelays(ctx, t0, 10)
	must(t, err)
	st, err := s.Stats(ctx)
	must(t, err)
	if st.Devices != 1 || st.Deliveries[store.DeliveryInFlight] != 1 || st.Relays[store.RelaySending] != 1 {
		t.Errorf("stats %+v", st)
	}
	rec, err := s.Recover(ctx)
	must(t, err)
	if rec.Deliveries != 1 || rec.Relays != 1 {
		t.Errorf("recovered %+v", rec)
	}
	c2, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
	must(t, err)
	if c2.ID != c.ID || c2.Attempts != 2 {
		t.Errorf("after recover claimed %+v", c2)
	}
	must(t, s.FinishDelivery(ctx, c2.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered, Status: 2}))
	sub, _, err := s.AddSubmission(ctx, &store.Submission{Device: 10, ContentHash: []byte{1}, ContentType: 32,
		Content: []byte{1}, Received: t0}, t0)
	must(t, err)
	_, err = s.DropSubmission(ctx, sub.ID, "drop")
	must(t, err)

	// Nothing finished before 'before' yet (rows were changed just now).
	n, err := s.Purge(ctx, time.Now().Add(-time.Hour), time.Now().Add(-time.Hour))
	must(t, err)
	if n != 0 {
		t.Errorf("purged %d recent rows", n)
	}
	n, err = s.Purge(ctx, time.Now().Add(time.Hour), time.Now().Add(time.Hour))
	must(t, err)
	if n != 3 { // delivered delivery, dropped submission, status
		t.Errorf("purged %d rows, want 3", n)
	}
	if _, err := s.DeliveryStatus(ctx, 10, "a"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("status after purge: %v", err)
	}
	st, _ = s.Stats(ctx)
	if st.Deliveries[store.DeliveryQueued] != 1 || st.Relays[store.RelayQueued] != 1 || st.Deliveries[store.DeliveryDelivered] != 0 {
		t.Errorf("stats after purge %+v", st)
	}
	must(t, s.Ping(ctx))
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

// testImportDevices: a batch is written in one transaction, each device
// whole or refused alone.
func testImportDevices(t *testing.T, s store.Store) {
	ctx := context.Background()
	must(t, s.AddDevice(ctx, dev(50, "192.0.2.50", "taken@example.net")))
	v0, err := s.RegistryVersion(ctx)
	must(t, err)
	batch := []*store.Device{
		dev(1, "192.0.2.1", "a1@example.net", "b1@example.net"),
		dev(50, "192.0.2.51", "new50@example.net"),                 // exists
		dev(2, "192.0.2.2", "c2@example.net", "taken@example.net"), // alias of 50
		dev(3, "192.0.2.3", "a1@example.net"),                      // alias of 1, same batch
		{Address: 4, IP: netip.MustParseAddr("192.0.2.4"), Version: "1.1", Mode: "fast"},
		dev(5, "192.0.2.5"),
	}
	res, err := s.ImportDevices(ctx, batch, false)
	must(t, err)
	if len(res) != len(batch) {
		t.Fatalf("%d results for %d devices", len(res), len(batch))
	}
	for i, want := range []error{nil, store.ErrExists, store.ErrExists, store.ErrExists, store.ErrInvalid, nil} {
		if want == nil && res[i].Err != nil || want != nil && !errors.Is(res[i].Err, want) || res[i].Updated {
			t.Errorf("device %d: %+v, want %v", batch[i].Address, res[i], want)
		}
	}
	for _, a := range []uint32{2, 3, 4} {
		if _, err := s.Device(ctx, a); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("refused device %d written: %v", a, err)
		}
	}
	if d, err := s.Device(ctx, 50); err != nil || d.IP.String() != "192.0.2.50" || !slices.Equal(d.Aliases, []string{"taken@example.net"}) {
		t.Errorf("existing device changed without update: %+v %v", d, err)
	}
	if d, err := s.Device(ctx, 1); err != nil || !slices.Equal(d.Aliases, []string{"a1@example.net", "b1@example.net"}) {
		t.Errorf("device 1: %+v %v", d, err)
	}
	if v, _ := s.RegistryVersion(ctx); v == v0 {
		t.Error("registry version unchanged")
	}
	// With update: 50 is replaced (its aliases too), 2 is added now that
	// its alias is free.
	res, err = s.ImportDevices(ctx, []*store.Device{dev(50, "192.0.2.51", "new50@example.net"), dev(2, "192.0.2.2", "taken@example.net")}, true)
	must(t, err)
	if res[0].Err != nil || !res[0].Updated || res[1].Err != nil || res[1].Updated {
		t.Errorf("update batch: %+v", res)
	}
	if d, err := s.Device(ctx, 50); err != nil || d.IP.String() != "192.0.2.51" || !slices.Equal(d.Aliases, []string{"new50@example.net"}) {
		t.Errorf("device 50 after update: %+v %v", d, err)
	}
	if d, err := s.Device(ctx, 2); err != nil || !slices.Equal(d.Aliases, []string{"taken@example.net"}) {
		t.Errorf("device 2: %+v %v", d, err)
	}
}
