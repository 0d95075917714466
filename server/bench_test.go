package server

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ua"
)

// BenchmarkSubmit measures submissions per second through the server over
// loopback UDP with the embedded SQLite store (synchronous=FULL: one
// durable commit per submission before its RESULT), from 8 devices in
// parallel, each with a password (checked once with bcrypt, then cached).
// Recipients are on the Internet with no smarthost, so the relay queue
// grows and nothing else competes.
func BenchmarkSubmit(b *testing.B) {
	benchTimers := esro.Timers{Acknowledgement: 10 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
		Retransmit: 200 * time.Millisecond, NSDULifetime: 100 * time.Millisecond, RetransmitCount: 4}
	for _, size := range []int{100, 4000} {
		b.Run(fmt.Sprintf("body=%d", size), func(b *testing.B) {
			c := testConfig(b)
			c.SMTP.Listen, c.Admin.Listen = "", ""
			// Timers a loaded machine keeps up with: a performer gives up
			// after T_noresp (here 2.9 s) rather than the tests' 0.3 s.
			setTimers(c, benchTimers)
			s := startServer(b, c)
			const devices = 8
			var devs []*testDevice
			for i := range devices {
				devs = append(devs, newDevice(b, s, emsd.Address(198100+i), deviceOpts{password: "pw", timers: benchTimers}))
			}
			body := make([]byte, size)
			for i := range body {
				body[i] = 'a' + byte(i%26)
				if i%70 == 69 {
					body[i] = '\n'
				}
			}
			msg := &ua.Message{To: []string{"someone@example.com"}, Subject: "bench", Body: body}
			// Warm up: the first submission of each device checks its
			// password with bcrypt.
			for _, d := range devs {
				if _, err := d.ua.Submit(context.Background(), msg); err != nil {
					b.Fatal(err)
				}
			}
			perDevice(b, devs, "submissions/s", func(d *testDevice) error {
				_, err := d.ua.Submit(context.Background(), msg)
				return err
			})
		})
	}
}

// BenchmarkPoll measures delivery controls (polls, as emsdp ua receive
// --poll sends every 25 s) per second through the server from 8 devices
// with passwords, on SQLite. Each records the device's contact: "cached"
// writes it only when it moves or every quarter contact_lifetime, as a
// fleet polling every 25 s would see; "write-every-poll" forces a durable
// store write per poll (contact_lifetime 1ms), the cost the cache saves.
func BenchmarkPoll(b *testing.B) {
	benchTimers := esro.Timers{Acknowledgement: 10 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
		Retransmit: 200 * time.Millisecond, NSDULifetime: 100 * time.Millisecond, RetransmitCount: 4}
	for _, tc := range []struct {
		name     string
		lifetime time.Duration
	}{{"cached", 2 * time.Minute}, {"write-every-poll", time.Millisecond}} {
		b.Run(tc.name, func(b *testing.B) {
			c := testConfig(b)
			c.SMTP.Listen, c.Admin.Listen = "", ""
			c.Delivery.ContactLifetime = Duration(tc.lifetime)
			setTimers(c, benchTimers)
			s := startServer(b, c)
			const devices = 8
			var devs []*testDevice
			for i := range devices {
				d := newDevice(b, s, emsd.Address(198100+i), deviceOpts{password: "pw", timers: benchTimers})
				if _, err := d.ua.DeliveryControl(context.Background(), nil); err != nil { // bcrypt once
					b.Fatal(err)
				}
				devs = append(devs, d)
			}
			perDevice(b, devs, "polls/s", func(d *testDevice) error {
				_, err := d.ua.DeliveryControl(context.Background(), nil)
				return err
			})
		})
	}
}

// perDevice runs b.N operations shared among the devices, each device on
// its own goroutine, and reports them per second as unit.
func perDevice(b *testing.B, devs []*testDevice, unit string, op func(*testDevice) error) {
	work := make(chan struct{}, b.N)
	for range b.N {
		work <- struct{}{}
	}
	close(work)
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for _, d := range devs {
		wg.Go(func() {
			for range work {
				if err := op(d); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), unit)
}
