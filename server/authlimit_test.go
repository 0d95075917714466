package server

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/testclock"
	"github.com/esro-emsdp/emsdp/server/internal/authlimit"
)

func TestAuthLimitConfig(t *testing.T) {
	limits := func(e EMSDConfig) [5]float64 {
		return [5]float64{float64(e.AuthFailuresBurst), e.AuthFailuresRate, float64(e.DeviceAuthFailuresBurst),
			e.DeviceAuthFailuresRate, float64(e.AuthFailuresTracked)}
	}
	if got, want := limits(DefaultConfig().EMSD), [5]float64{10, 6, 20, 12, 65536}; got != want {
		t.Errorf("default limits %v, want %v", got, want)
	}
	for _, tc := range []struct {
		name, text string
		check      func(*Config) bool
		wantErr    string
	}{
		{"fractional rate", "[emsd]\nauth_failures_rate = 0.5\n",
			func(c *Config) bool { return c.EMSD.AuthFailuresRate == 0.5 }, ""},
		{"limits off", "[emsd]\nauth_failures_burst = 0\ndevice_auth_failures_burst = 0\n",
			func(c *Config) bool { return c.EMSD.AuthFailuresBurst == 0 && c.EMSD.DeviceAuthFailuresBurst == 0 }, ""},
		{"negative burst", "[emsd]\nauth_failures_burst = -1\n", nil, "emsd.auth_failures_burst -1"},
		{"huge burst", "[emsd]\ndevice_auth_failures_burst = 1000000\n", nil, "emsd.device_auth_failures_burst"},
		{"zero rate", "[emsd]\nauth_failures_rate = 0\n", nil, "emsd.auth_failures_rate 0"},
		{"negative rate", "[emsd]\ndevice_auth_failures_rate = -6\n", nil, "emsd.device_auth_failures_rate -6"},
		{"NaN rate", "[emsd]\nauth_failures_rate = nan\n", nil, "emsd.auth_failures_rate NaN"},
		{"infinite rate", "[emsd]\nauth_failures_rate = inf\n", nil, "emsd.auth_failures_rate +Inf"},
		{"rate as text", "[emsd]\nauth_failures_rate = \"6/m\"\n", nil, "auth_failures_rate"},
		{"nothing tracked", "[emsd]\nauth_failures_tracked = 0\n", nil, "emsd.auth_failures_tracked 0"},
		{"too many tracked", "[emsd]\nauth_failures_tracked = 100000000\n", nil, "emsd.auth_failures_tracked"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := LoadConfig(writeFile(t, tc.text))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one mentioning %q", err, tc.wantErr)
				}
				return
			}
			must(t, err)
			if !tc.check(c) {
				t.Errorf("config %+v", c.EMSD)
			}
		})
	}
}

// deliveryControl invokes delivery control (2-way, SAP 9) with
// credentials for dev from ep.
func deliveryControl(t *testing.T, s *Server, ep *esro.Endpoint, dev emsd.Address, pw string) answer {
	t.Helper()
	arg, err := (&emsd.DeliveryControlArgument{Security: &emsd.SecurityElement{
		Address: &emsd.EMSDAddress{Address: dev}, Password: pw}}).Marshal(emsd.Options{})
	must(t, err)
	res, err := ep.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: 9, Operation: 2,
		Handshake: esro.TwoWay, Data: arg})
	a := outcomeOf(res, err)
	if a.kind == "result" {
		a.data = ""
	}
	return a
}

// The failed-authentication limits through the server: a limited source
// (or device) gets the transient ERROR 6 with parameter 6, even for the
// correct password, and the refusals are counted.
func TestAuthFailureLimit(t *testing.T) {
	clk := testclock.New()
	s := startServerWith(t, testConfig(t), Options{Logger: testLogger(t), now: clk.Now})
	home := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198036, epAddr(home), deviceOpts{password: "pw"})
	a, b, c := listenESRO(t, "127.0.0.21"), listenESRO(t, "127.0.0.22"), listenESRO(t, "127.0.0.23")
	var spread []*esro.Endpoint
	for i := range 12 {
		spread = append(spread, listenESRO(t, fmt.Sprintf("127.0.0.%d", 31+i)))
	}
	wrong := answer{"error", 4, "020104"}
	limitedAns := answer{"error", 6, "020106"} // transient: the device retries later
	ok := answer{kind: "result"}
	limited := func(limit string) float64 { return s.metrics.counter(t, "emsd_auth_limited_total", limit) }

	type step struct {
		what     string
		after    time.Duration
		from     []*esro.Endpoint
		pw       string
		want     answer
		bySource float64 // emsd_auth_limited_total afterwards
		byDevice float64
	}
	for _, st := range []step{
		// pwCache now holds the password: it must not answer for a
		// limited source either.
		{what: "the device at home", from: []*esro.Endpoint{home}, pw: "pw", want: ok},
		{what: "10 wrong passwords, checked", from: slices.Repeat([]*esro.Endpoint{a}, 10), pw: "x", want: wrong},
		{what: "the 11th, limited", from: []*esro.Endpoint{a}, pw: "x", want: limitedAns, bySource: 1},
		{what: "correct password from the limited source", from: []*esro.Endpoint{a}, pw: "pw", want: limitedAns, bySource: 2},
		{what: "another source", from: []*esro.Endpoint{b}, pw: "pw", want: ok, bySource: 2},
		{what: "the device at home again", from: []*esro.Endpoint{home}, pw: "pw", want: ok, bySource: 2},
		{what: "a failure regained", after: 10 * time.Second, from: []*esro.Endpoint{a}, pw: "pw", want: ok, bySource: 2},
		// The device has 10 failures from a, 2 of them regained (12 a minute).
		{what: "12 more from 12 sources", from: spread, pw: "x", want: wrong, bySource: 2},
		{what: "device limited", from: []*esro.Endpoint{c}, pw: "pw", want: limitedAns, bySource: 2, byDevice: 1},
		{what: "device limited for b too", from: []*esro.Endpoint{b}, pw: "pw", want: limitedAns, bySource: 2, byDevice: 2},
		{what: "device at home unaffected", from: []*esro.Endpoint{home}, pw: "pw", want: ok, bySource: 2, byDevice: 2},
		{what: "device failure regained", after: 5 * time.Second, from: []*esro.Endpoint{c}, pw: "pw", want: ok, bySource: 2, byDevice: 2},
	} {
		clk.Advance(st.after)
		for i, ep := range st.from {
			if got := deliveryControl(t, s, ep, 198036, st.pw); got != st.want {
				t.Fatalf("%s (#%d from %s): %+v, want %+v", st.what, i, epAddr(ep), got, st.want)
			}
		}
		if gs, gd := limited(authlimit.LimitSource), limited(authlimit.LimitDevice); gs != st.bySource || gd != st.byDevice {
			t.Errorf("%s: limited source %v device %v, want %v %v", st.what, gs, gd, st.bySource, st.byDevice)
		}
	}
	if got := s.metrics.counter(t, "emsd_auth_failures_tracked", authlimit.LimitSource); got != 13 {
		t.Errorf("sources tracked %v, want 13", got)
	}
}

// compat.ip_only_identification checks no password, so the limiter never
// refuses anything there.
func TestAuthFailureLimitIPOnly(t *testing.T) {
	c := testConfig(t)
	c.Compat.IPOnlyIdentification = true
	c.EMSD.AuthFailuresBurst, c.EMSD.DeviceAuthFailuresBurst = 1, 1
	s := startServerWith(t, c, Options{Logger: testLogger(t), now: testclock.New().Now})
	ep := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198036, epAddr(ep), deviceOpts{password: "pw"})
	for i := range 5 {
		if got := deliveryControl(t, s, ep, 198036, "wrong"); got.kind != "result" {
			t.Fatalf("attempt %d: %+v, want a result", i, got)
		}
	}
	if got := s.metrics.counter(t, "emsd_auth_limited_total", authlimit.LimitSource); got != 0 {
		t.Errorf("limited %v", got)
	}
	if got := s.metrics.counter(t, "emsd_auth_failures_tracked", authlimit.LimitSource); got != 0 {
		t.Errorf("sources tracked %v", got)
	}
}

// 32 devices behind one address authenticate at once on a server just
// started (cold password cache): none is refused. What is asserted is
// that every device gets its RESULT, however long the last one waits:
// the password checks take their turns (authlimit.Limiter) and the
// contacts are written one after another, about 100 ms each under the
// race detector (the store is instrumented too), so the last answer can
// take seconds, where fastTimers give up after 290 ms. Server and devices
// wait up to T_noresp = 2L + (N+1)(R+RT) = 13.4 s.
func TestAuthConcurrentOneAddress(t *testing.T) {
	timers := patientTimers
	timers.RetransmitCount = 32
	c := testConfig(t)
	setTimers(c, timers)
	s := startServerWith(t, c, Options{Logger: testLogger(t)})
	var eps []*esro.Endpoint
	for i := range 32 {
		ep := listenESROTimers(t, "127.0.0.77", timers)
		addDevice(t, s, emsd.Address(198100+i), netip.MustParseAddrPort("127.0.0.1:9"), deviceOpts{password: fmt.Sprint("pw", i)})
		eps = append(eps, ep)
	}
	var wg sync.WaitGroup
	answers := make([]answer, len(eps))
	for i, ep := range eps {
		wg.Go(func() { answers[i] = deliveryControl(t, s, ep, emsd.Address(198100+i), fmt.Sprint("pw", i)) })
	}
	wg.Wait()
	for i, a := range answers {
		if a.kind != "result" {
			t.Errorf("device %d: %+v", i, a)
		}
	}
}
