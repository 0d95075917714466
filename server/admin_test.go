package server

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/ua"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	must(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	must(t, err)
	return resp.StatusCode, string(b)
}

// The admin listener serves Prometheus metrics from the server's own
// registry (esro_*, emsd_*, gateway_*), a health check and pprof.
func TestAdmin(t *testing.T) {
	db, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "own.db"), nil)
	must(t, err)
	c := testConfig(t)
	s, err := Start(context.Background(), c, Options{Logger: testLogger(t), Store: db})
	must(t, err)
	defer s.Close()
	dev := newDevice(t, s, 198036, deviceOpts{})
	_, err = dev.ua.Submit(context.Background(), &ua.Message{To: []string{"x@example.com"}, Subject: "m", Body: []byte("b\n")})
	must(t, err)
	must(t, sendMail(s, "a@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "in", "b")))
	dev.next(t)
	// The device has it; the server records it when the RESULT arrives.
	eventually(t, "delivery recorded", func() bool { return s.metrics.counter(t, "emsd_deliveries_total", "delivered") == 1 })
	sendMail(s, "a@example.com", []string{"nobody@emsd.test"}, inboundMsg("nobody@emsd.test", "x", "b"))
	base := "http://" + s.Addrs().Admin.String()
	code, body := get(t, base+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`emsd_submissions_total{result="accepted"} 1`,
		`emsd_invocations_total{operation="submission"} 1`,
		`emsd_deliveries_total{outcome="delivered"} 1`,
		`emsd_devices 1`,
		`emsd_queue_deliveries{state="delivered"} 1`,
		`gateway_queue_relays{state="queued"} 1`,
		`gateway_inbound_total{result="accepted"} 1`,
		`gateway_inbound_total{result="unknown_recipient"} 1`,
		`emsd_submissions_pending 0`,
		`esro_invokes_received_total 1`,
		`esro_invokes_sent_total 1`,
		`esro_drops_total{reason=`,
		`esro_failures_total{direction="local",reason="0"} 0`,
		`esro_in_flight{role="invoker"}`,
		`emsdp_build_info{goversion="go`,
		`go_goroutines `,
		`go_memstats_heap_alloc_bytes `,
		`process_resident_memory_bytes `,
		// Latencies, and series at zero before their first event.
		`emsd_submission_duration_seconds_count 1`,
		`emsd_delivery_duration_seconds_count{outcome="delivered"} 1`,
		`emsd_delivery_duration_seconds_count{outcome="failed"} 0`,
		`gateway_relay_duration_seconds_count `,
		`emsd_errors_sent_total{code="security-error",operation="submit"} 0`,
		`emsd_reports_total{kind="dsn"} 0`,
		`gateway_relay_total{outcome="failed"} 0`,
		`emsd_submission_verifies_total{verdict="drop"} 0`,
		`emsd_auth_limited_total{limit="device"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(body, "promhttp_metric_handler_requests_total") {
		t.Error("/metrics serves the global default registry")
	}
	if code, body := get(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, _ := get(t, base+"/debug/pprof/"); code != 200 {
		t.Errorf("/debug/pprof/: %d", code)
	}
	db.Close()
	if code, body := get(t, base+"/healthz"); code != 503 || !strings.Contains(body, "store") {
		t.Errorf("/healthz with the store closed: %d %q", code, body)
	}
}

// Registry edits made by another process (emsdp device) reach a running
// server without a signal; removed devices are refused.
func TestRegistryEditedElsewhere(t *testing.T) {
	c := testConfig(t)
	s := startServer(t, c)
	other, err := sqlite.OpenDir(context.Background(), c.Data, nil)
	must(t, err)
	defer other.Close()
	ep := listenESRO(t, "127.0.0.1")
	ap := epAddr(ep)
	must(t, other.AddDevice(context.Background(), &store.Device{Address: 198036, IP: ap.Addr(), Port: ap.Port(),
		Version: "1.1", Mode: store.ModeComplete}))
	arg := emsd.PrependInstanceID(0, submitArg(t, nil, emsd.ContentIPM, testIPM("x@example.com"), emsd.Options{}))
	invoke := func() answer {
		res, err := ep.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: 5, Operation: 33,
			Handshake: esro.ThreeWay, Data: arg})
		return outcomeOf(res, err)
	}
	eventually(t, "device known", func() bool { return invoke().kind == "result" })
	must(t, other.RemoveDevice(context.Background(), 198036))
	eventually(t, "device forgotten", func() bool { return invoke() == answer{"error", 4, "020104"} })
}

// The EMSD socket gets the receive buffer emsd.receive_buffer asks for (as
// root here, past net.core.rmem_max), and reports what it got.
func TestReceiveBuffer(t *testing.T) {
	c := testConfig(t)
	c.EMSD.ReceiveBuffer = 4 << 20
	c.Admin.Listen = "127.0.0.1:0"
	s := startServerWith(t, c, Options{Logger: testLogger(t)})
	got := s.metrics.counter(t, "emsd_receive_buffer_bytes", "")
	max, err := os.ReadFile("/proc/sys/net/core/rmem_max")
	if err != nil {
		t.Skipf("no /proc/sys/net/core/rmem_max (%v): cannot tell what the system allows", err)
	}
	rmemMax, _ := strconv.Atoi(strings.TrimSpace(string(max)))
	if got != 4<<20 && !(os.Geteuid() != 0 && int(got) >= rmemMax) {
		t.Errorf("receive buffer %v, want %d (rmem_max %d, euid %d)", got, 4<<20, rmemMax, os.Geteuid())
	}
}

// admin.pprof = false keeps /metrics and /healthz and drops the profiler.
func TestAdminNoPprof(t *testing.T) {
	c := testConfig(t)
	c.Admin.PProf = false
	s := startServer(t, c)
	base := "http://" + s.Addrs().Admin.String()
	if code, _ := get(t, base+"/debug/pprof/"); code != 404 {
		t.Errorf("/debug/pprof/ with pprof off: %d", code)
	}
	if code, body := get(t, base+"/metrics"); code != 200 || !strings.Contains(body, "emsdp_build_info") {
		t.Errorf("/metrics with pprof off: %d", code)
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz with pprof off: %d", code)
	}
	if !DefaultConfig().Admin.PProf {
		t.Error("pprof is off by default")
	}
}
