package ua

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
	"github.com/esro-emsdp/emsdp/ua/uatest"
)

// fastTimers are short ESRO timers for loopback tests; both ends use them.
var fastTimers = esro.Timers{Acknowledgement: 5 * time.Millisecond, Roundtrip: 20 * time.Millisecond,
	Retransmit: 30 * time.Millisecond, NSDULifetime: 20 * time.Millisecond, RetransmitCount: 4}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func ptr[T any](v T) *T { return &v }

// recorder is a Handler that keeps every delivery; fail makes it refuse
// the next n.
type recorder struct {
	mu   sync.Mutex
	got  []*Delivery
	fail int
}

func (r *recorder) Deliver(_ context.Context, d *Delivery) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail > 0 {
		r.fail--
		return errors.New("disk full")
	}
	r.got = append(r.got, d)
	return nil
}

func (r *recorder) deliveries() []*Delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*Delivery(nil), r.got...)
}

// device is a Client on its own endpoint.
type device struct {
	*Client
	ep   *esro.Endpoint
	addr netip.AddrPort
	rec  *recorder
}

func newDevice(t testing.TB, conn net.PacketConn, timers esro.Timers, cfg Config) *device {
	t.Helper()
	ep, err := esro.NewEndpoint(conn, &esro.Config{Timers: timers, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })
	d := &device{ep: ep, rec: &recorder{}}
	a := ep.LocalAddr().(*net.UDPAddr).AddrPort()
	d.addr = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
	if cfg.Handler == nil {
		cfg.Handler = d.rec
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	d.Client, err = New(ep, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// udpPair starts a uatest MTS and a device on loopback UDP.
func udpPair(t *testing.T, cfg Config) (*uatest.MTS, *device) {
	t.Helper()
	mc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	must(t, err)
	m := uatest.NewMTS(t, mc, fastTimers)
	dc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	must(t, err)
	cfg.Server = m.Addr()
	if cfg.Address == 0 {
		cfg.Address = 198036
	}
	m.SetPassword(cfg.Address, cfg.Password)
	return m, newDevice(t, dc, fastTimers, cfg)
}

// lossyPair is udpPair on a lossynet network (call inside a synctest
// bubble).
func lossyPair(t *testing.T, n *lossynet.Network, timers esro.Timers, cfg Config) (*uatest.MTS, *device) {
	t.Helper()
	mc, err := n.Listen("127.0.0.10:2002")
	must(t, err)
	m := uatest.NewMTS(t, mc, timers)
	dc, err := n.Listen("127.0.0.11:2002")
	must(t, err)
	cfg.Server = m.Addr()
	if cfg.Address == 0 {
		cfg.Address = 198036
	}
	m.SetPassword(cfg.Address, cfg.Password)
	return m, newDevice(t, dc, timers, cfg)
}
