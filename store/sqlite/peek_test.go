package sqlite

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// PeekDeliveries answers for each device what PeekDelivery and
// DeviceContact answer alone, and leaves out the devices they would
// refuse (nothing due, or a delivery in flight).
func TestPeekDeliveries(t *testing.T) {
	ctx := context.Background()
	db := openTemp(t)
	defer db.Close()
	now := time.Now().Truncate(time.Millisecond)
	for a := uint32(1); a <= 5; a++ {
		if err := db.AddDevice(ctx, testDevice(a)); err != nil {
			t.Fatal(err)
		}
	}
	c := store.Contact{Addr: netip.MustParseAddrPort("127.0.0.9:5000"), Via: "here", At: now}
	if _, _, err := db.SetContact(ctx, 2, c); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ReserveInstanceIDs(ctx, 2, 7); err != nil {
		t.Fatal(err)
	}
	var w store.Work
	add := func(dev uint32, id string, next time.Time) {
		w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: dev, MessageID: id, ContentType: 32,
			Content: []byte{0x30, 0}, Priority: 1, NextAttempt: next, Expires: now.Add(time.Hour)})
	}
	// 1 and 2: two due each; 3: one due later; 4: one in flight and one
	// due; 5: nothing.
	for _, dev := range []uint32{1, 2} {
		add(dev, fmt.Sprintf("L:%d.a", dev), now)
		add(dev, fmt.Sprintf("L:%d.b", dev), now.Add(-time.Minute))
	}
	add(3, "L:3.a", now.Add(time.Minute))
	add(4, "L:4.a", now)
	add(4, "L:4.b", now)
	if err := db.Enqueue(ctx, w); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ClaimDelivery(ctx, 4, now, store.Limits{}); err != nil {
		t.Fatal(err)
	}
	next := func(*store.Delivery) int { return 1 }
	got, err := db.PeekDeliveries(ctx, []uint32{1, 2, 3, 4, 5, 99}, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("peeked devices %v, want 1 and 2", keys(got))
	}
	for _, dev := range []uint32{1, 2} {
		p, ok := got[dev]
		if !ok {
			t.Fatalf("device %d not peeked", dev)
		}
		want, err := db.PeekDelivery(ctx, dev, now, store.Limits{InstanceIDs: next})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(p.Delivery, want) {
			t.Errorf("device %d: batch read %+v, alone %+v", dev, p.Delivery, want)
		}
		wc, err := db.DeviceContact(ctx, dev)
		if err != nil {
			t.Fatal(err)
		}
		if p.Contact != wc {
			t.Errorf("device %d: contact %+v, alone %+v", dev, p.Contact, wc)
		}
	}
	if got[2].Delivery.InstanceBase != 7 || got[2].Contact.Addr != c.Addr {
		t.Errorf("device 2: instance base %d, contact %v; want 7, %v", got[2].Delivery.InstanceBase, got[2].Contact.Addr, c.Addr)
	}
	// An unreadable contact is left zero, as PeekDelivery leaves it: the
	// device is peeked all the same.
	if _, err := db.sql.ExecContext(ctx, `UPDATE devices SET contact_addr = 'nonsense', contact_at = 1 WHERE address = 2`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.DeviceContact(ctx, 2); err == nil {
		t.Fatal("an unreadable contact was read")
	}
	alone, err := db.PeekDelivery(ctx, 2, now, store.Limits{InstanceIDs: next})
	if err != nil {
		t.Fatal(err)
	}
	got, err = db.PeekDeliveries(ctx, []uint32{2}, now)
	if p, ok := got[2]; err != nil || !ok || p.Contact != (store.Contact{}) || !reflect.DeepEqual(p.Delivery, alone) {
		t.Errorf("unreadable contact: batch %+v %v, alone %+v", got, err, alone)
	}
	if none, err := db.PeekDeliveries(ctx, nil, now); err != nil || len(none) != 0 {
		t.Errorf("no devices: %v, %v", none, err)
	}
}

func keys(m map[uint32]store.Peeked) []uint32 {
	var out []uint32
	for k := range m {
		out = append(out, k)
	}
	return out
}
