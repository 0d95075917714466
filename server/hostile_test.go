package server

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ua"
)

// Refused INVOKEs from sources that never authenticated keep no
// invocation, only tombstones, and get no more back than they sent; a
// device whose password matched is proven and answered in full.
func TestRefusalsKeepNoSlot(t *testing.T) {
	s := startServer(t, testConfig(t))
	d := newDevice(t, s, 198036, deviceOpts{password: "pw"})
	if _, err := d.ua.Submit(context.Background(), &ua.Message{To: []string{"bob@example.com"}, Subject: "s", Body: []byte("b\n")}); err != nil {
		t.Fatal(err)
	}
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 33)})
	must(t, err)
	defer c.Close()
	const n = 200
	for i := range n {
		b, _ := esro.AppendPDU(nil, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: uint8(i), Operation: 33})
		_, err := c.WriteToUDPAddrPort(b, s.Addrs().EMSD)
		must(t, err)
		if i%32 == 31 {
			time.Sleep(time.Millisecond)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.ESROStats().Tombstones < n {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v", s.ESROStats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := s.ESROStats(); st.InFlightUnproven != 0 || st.Withheld != 0 {
		t.Errorf("%d unproven in flight, %d withheld", st.InFlightUnproven, st.Withheld)
	}
	// Each 3-octet INVOKE got at most a 3-octet ERROR.
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	got, octets := 0, 0
	buf := make([]byte, 100)
	for {
		k, err := c.Read(buf)
		if err != nil {
			break
		}
		got++
		octets += k
	}
	if got > n || octets > 3*n {
		t.Errorf("%d datagrams, %d octets back for %d, %d", got, octets, n, 3*n)
	}
}

// A flood of forged INVOKEs from many addresses does not make a
// registered device's submissions fail.
func TestFloodDoesNotStarveDevices(t *testing.T) {
	c := testConfig(t)
	setTimers(c, floodTestTimers)
	s := startServer(t, c)
	devs := make([]*testDevice, 4)
	for i := range devs {
		devs[i] = newDevice(t, s, emsd.Address(198036+i), deviceOpts{password: "pw", timers: floodTestTimers})
	}
	msg := &ua.Message{To: []string{"bob@example.com"}, Subject: "s", Body: []byte("b\n")}
	var socks []*net.UDPConn
	for i := range 64 {
		sc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 3, byte(i/16), byte(i%16+1))})
		must(t, err)
		defer sc.Close()
		socks = append(socks, sc)
	}
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for n := 0; ctx.Err() == nil; n++ {
			b, _ := esro.AppendPDU(nil, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: uint8(n / 64), Operation: 33})
			socks[n%64].WriteToUDPAddrPort(b, s.Addrs().EMSD)
			if n%256 == 255 {
				time.Sleep(time.Millisecond) // a flood, but one the test machine's other tests survive
			}
		}
	})
	defer func() { stop(); wg.Wait() }()
	for deadline := time.Now().Add(10 * time.Second); s.ESROStats().InvokesReceived < 3000 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	var errs []error
	var mu sync.Mutex
	var dwg sync.WaitGroup
	for _, d := range devs {
		dwg.Go(func() {
			for range 5 {
				sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				_, err := d.ua.Submit(sctx, msg)
				cancel()
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	dwg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d submissions failed, first: %v", len(errs), 5*len(devs), errs[0])
	}
	if st := s.ESROStats(); st.InvokesReceived < 3000 {
		t.Errorf("only %d INVOKEs reached the server: no flood", st.InvokesReceived)
	}
}

// floodTestTimers give a device's submission room for a busy machine.
var floodTestTimers = esro.Timers{Acknowledgement: 20 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
	Retransmit: 200 * time.Millisecond, NSDULifetime: 100 * time.Millisecond, RetransmitCount: 6}
