package storetest

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

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
