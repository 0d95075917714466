// Package storetest is the conformance suite every store.Store backend
// runs: registry, counters, submissions with dedupe, the delivery and relay
// queue state machines (with a randomised model check), the operator's
// queue methods and maintenance.
package storetest

import (
	"errors"
	"net/netip"
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
