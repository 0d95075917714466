package server

import (
	"bytes"
	"context"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
)

// A submission is routed before anything is formatted: mail for devices
// only makes deliveries and no relay, and the Internet copy exists only
// when some recipient is on the Internet. The release takes the IPM the
// handler decoded; a submission found pending at start is decoded from
// the store, and both give the same work.
func TestSubmissionWorkRoutesFirst(t *testing.T) {
	s := startServer(t, testConfig(t))
	addDevice(t, s, 198036, netip.MustParseAddrPort("127.0.0.1:9"), deviceOpts{})
	addDevice(t, s, 198037, netip.MustParseAddrPort("127.0.0.1:10"), deviceOpts{})
	ctx := context.Background()
	received := time.Date(2026, 12, 8, 1, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name                 string
		to                   []string
		deliveries, internet int
	}{
		{"devices only", []string{"198.037"}, 1, 0},
		{"device by Internet address", []string{"198037@emsd.test"}, 1, 0},
		{"Internet only", []string{"bob@example.net", "carol@example.net"}, 0, 2},
		{"both", []string{"198.037", "bob@example.net"}, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ipm := testIPM(tc.to...)
			content, err := ipm.Marshal(emsd.Options{})
			must(t, err)
			rec := &store.Submission{ID: 1, Device: 198036, LocalTime: uint32(received.Unix()), Number: 7,
				ContentType: uint32(emsd.ContentIPM), Content: content, Received: received}
			live, err := s.perf.submissionWork(ctx, rec, ipm)
			must(t, err)
			stored, err := s.perf.submissionWork(ctx, rec, nil)
			must(t, err)
			if len(live.Deliveries) != tc.deliveries {
				t.Errorf("%d deliveries, want %d", len(live.Deliveries), tc.deliveries)
			}
			for _, d := range live.Deliveries {
				// The copy names the device as a local recipient (copyFor):
				// the submitted octets when they already did.
				var got emsd.IPM
				must(t, got.Unmarshal(d.Content, emsd.Options{}))
				if d.Device != 198037 || got.Heading.Recipients[0].Recipient != emsd.LocalOR(198037, "") {
					t.Errorf("delivery to %d naming %v, want to 198037 naming it", d.Device, got.Heading.Recipients[0].Recipient)
				}
				if tc.to[0] == "198.037" && !bytes.Equal(d.Content, content) {
					t.Errorf("delivery of %d octets, want the submitted %d", len(d.Content), len(content))
				}
			}
			rcpts := 0
			for _, r := range live.Relays {
				rcpts += len(r.Recipients)
			}
			if rcpts != tc.internet || (tc.internet == 0) != (len(live.Relays) == 0) {
				t.Errorf("%d relays to %d recipients, want one to %d", len(live.Relays), rcpts, tc.internet)
			}
			if !reflect.DeepEqual(timeless(live), timeless(stored)) {
				t.Errorf("the work of the decoded IPM and of the stored octets differ:\n%+v\n%+v", live, stored)
			}
		})
	}
}

// timeless is w without the times taken from the clock.
func timeless(w store.Work) store.Work {
	for i := range w.Deliveries {
		w.Deliveries[i].NextAttempt, w.Deliveries[i].Expires = time.Time{}, time.Time{}
	}
	for i := range w.Relays {
		w.Relays[i].NextAttempt, w.Relays[i].Expires = time.Time{}, time.Time{}
	}
	return w
}
