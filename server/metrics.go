package server

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/internal/buildinfo"
	"github.com/esro-emsdp/emsdp/server/internal/authlimit"
	"github.com/esro-emsdp/emsdp/store"
)

// metrics are the server's Prometheus metrics, registered in a registry
// of its own (no global state): emsd_* for the EMSD service, gateway_*
// for Internet mail, esro_* from the ESRO endpoint's counters.
type metrics struct {
	reg         *prometheus.Registry
	invokes     *prometheus.CounterVec
	errors      *prometheus.CounterVec
	submissions *prometheus.CounterVec
	verifies    *prometheus.CounterVec
	deliveries  *prometheus.CounterVec
	reports     *prometheus.CounterVec
	inbound     *prometheus.CounterVec
	starttls    prometheus.Counter
	refused     *prometheus.CounterVec
	relay       *prometheus.CounterVec
	devices     prometheus.Gauge
	inflight    *prometheus.GaugeVec
	invocations prometheus.Counter
	paced       prometheus.Counter
	authLimited *prometheus.CounterVec
	// addressChanges counts devices heard from another address (or by
	// another server) than the one recorded.
	addressChanges prometheus.Counter
	// storeWriteFailures counts failed tries of outcome writes (each is
	// retried until it succeeds: outcomes.go).
	storeWriteFailures prometheus.Counter

	// Latencies: a submission INVOKE to its answer (the store commit
	// included), a delivery attempt to its outcome, an SMTP relay
	// transaction.
	submitTime  prometheus.Histogram
	deliverTime *prometheus.HistogramVec
	relayTime   prometheus.Histogram
}

// latencyBuckets span 1 ms (a loopback answer) to a minute (a delivery
// retransmitted until the device's ESRO timers give up).
var latencyBuckets = prometheus.ExponentialBucketsRange(0.001, 60, 14)

// Label values of the labelled series, all created at zero at start so
// that rate() and alerts see them before the first event.
var (
	invokeOps       = []string{"submission", "delivery_control", "delivery_verify", "other"}
	errorOps        = []string{"submit", "delivery_control", "delivery_verify", "other", "any"}
	submitResults   = []string{"accepted", "duplicate", "reinvoked"}
	verifyVerdicts  = []string{"send", "drop", "failure"}
	deliverOutcomes = []string{"delivered", "deferred", "failed", "expired", "requeued", "rejected"}
	reportKinds     = []string{"emsd", "notice", "dsn"}
	inboundResults  = []string{"accepted", "rejected", "unknown_recipient"}
	relayOutcomes   = []string{"sent", "deferred", "failed", "expired"}
)

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		invokes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "emsd_invocations_total",
			Help: "EMSD operations invoked by devices, by operation."}, []string{"operation"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "emsd_errors_sent_total",
			Help: "EMSD errors answered to devices, by operation and code."}, []string{"operation", "code"}),
		submissions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "emsd_submissions_total",
			Help: "Completed submissions: accepted, duplicate (re-invoked, same message id), reinvoked (segment answered again)."},
			[]string{"result"}),
		verifies: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "emsd_submission_verifies_total",
			Help: "Submission verify outcomes: send, drop, failure (no answer)."}, []string{"verdict"}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "emsd_deliveries_total",
			Help: "Delivery attempts to devices by outcome: delivered, deferred, failed, expired, requeued, rejected (at submission)."},
			[]string{"outcome"}),
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "emsd_reports_total",
			Help: "Reports generated: emsd (content type 2), notice (IPM), dsn (RFC 3464)."}, []string{"kind"}),
		inbound: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gateway_inbound_total",
			Help: "Inbound SMTP: accepted and rejected messages, unknown recipients."}, []string{"result"}),
		starttls: prometheus.NewCounter(prometheus.CounterOpts{Name: "gateway_inbound_starttls_total",
			Help: "Inbound SMTP connections that completed a STARTTLS handshake."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gateway_inbound_refused_total",
			Help: "Inbound SMTP connections refused with 421 by the connection limit they were over: ip (smtp.max_connections_per_ip) or total (smtp.max_connections)."},
			[]string{"limit"}),
		relay: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gateway_relay_total",
			Help: "Outbound relay recipients by outcome: sent, deferred, failed, expired."}, []string{"outcome"}),
		devices: prometheus.NewGauge(prometheus.GaugeOpts{Name: "emsd_devices", Help: "Devices in the registry."}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "emsd_delivery_attempts_in_flight",
			Help: "Delivery attempts in flight by kind: live (to devices that answered; at most delivery.concurrency), first (to devices not heard from), probe (to devices that did not answer; at most delivery.probes)."},
			[]string{"kind"}),
		invocations: prometheus.NewCounter(prometheus.CounterOpts{Name: "emsd_delivery_invocations_total",
			Help: "Delivery invocations sent to devices (one per segment), paced by delivery.rate."}),
		paced: prometheus.NewCounter(prometheus.CounterOpts{Name: "emsd_delivery_pacing_delay_seconds_total",
			Help: "Time delivery invocations waited for delivery.rate, summed over invocations."}),
		authLimited: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "emsd_auth_limited_total",
			Help: "Authentications refused unchecked, answered as a wrong password, because the source or the device was over its failed-authentication limit, by limit (source, device)."},
			[]string{"limit"}),
		addressChanges: prometheus.NewCounter(prometheus.CounterOpts{Name: "emsd_device_address_changes_total",
			Help: "Devices heard, with their password, from another address or through another server than the one their deliveries went to (NAT rebinding, a new lease, roaming between servers)."}),
	}
	m.reg.MustRegister(m.invokes, m.errors, m.submissions, m.verifies, m.deliveries, m.reports, m.inbound,
		m.starttls, m.relay, m.devices, m.inflight, m.invocations, m.paced)
	m.storeWriteFailures = prometheus.NewCounter(prometheus.CounterOpts{Name: "emsd_store_write_failures_total",
		Help: "Failed tries to record a delivery or relay outcome in the store; each is retried until it succeeds."})
	m.reg.MustRegister(m.authLimited, m.refused, m.addressChanges, m.storeWriteFailures)
	m.submitTime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "emsd_submission_duration_seconds",
		Help: "Time from a submission INVOKE (one segment) to its answer, the store commit included.", Buckets: latencyBuckets})
	m.deliverTime = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "emsd_delivery_duration_seconds",
		Help:    "Time of one delivery attempt to a device, all segments and retransmissions included, by outcome.",
		Buckets: latencyBuckets}, []string{"outcome"})
	m.relayTime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "gateway_relay_duration_seconds",
		Help: "Time of one SMTP relay transaction (one message, all its recipients).", Buckets: latencyBuckets})
	m.reg.MustRegister(buildinfo.Read().Collector(), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), m.submitTime, m.deliverTime, m.relayTime)
	for _, l := range invokeOps {
		m.invokes.WithLabelValues(l)
	}
	for _, op := range errorOps {
		for c := emsd.CodeProtocolVersion; c <= emsd.CodeProtocolViolation; c++ {
			m.errors.WithLabelValues(op, c.String())
		}
	}
	for vec, labels := range map[*prometheus.CounterVec][]string{m.submissions: submitResults, m.verifies: verifyVerdicts,
		m.deliveries: deliverOutcomes, m.reports: reportKinds, m.inbound: inboundResults, m.relay: relayOutcomes,
		m.authLimited: {authlimit.LimitSource, authlimit.LimitDevice}} {
		for _, l := range labels {
			vec.WithLabelValues(l)
		}
	}
	for _, l := range []string{"delivered", "deferred", "failed", "requeued"} { // outcomes of an attempt
		m.deliverTime.WithLabelValues(l)
	}
	for _, l := range []string{gateway.LimitTotal, gateway.LimitIP} {
		m.refused.WithLabelValues(l) // at 0 from the start, for rate()
	}
	for _, l := range []string{"live", "first", "probe"} { // kinds of delivery attempts
		m.inflight.WithLabelValues(l)
	}
	return m
}

// storeCollector reports queue depths at scrape time.
type storeCollector struct {
	st         store.Maintenance
	deliveries *prometheus.Desc
	relays     *prometheus.Desc
	pending    *prometheus.Desc
}

func newStoreCollector(st store.Maintenance) *storeCollector {
	return &storeCollector{
		st: st,
		deliveries: prometheus.NewDesc("emsd_queue_deliveries", "Deliveries to devices in the store, by state.",
			[]string{"state"}, nil),
		relays: prometheus.NewDesc("gateway_queue_relays", "Relay recipients in the store, by state.",
			[]string{"state"}, nil),
		pending: prometheus.NewDesc("emsd_submissions_pending",
			"Submissions committed whose RESULT is not yet confirmed.", nil, nil),
	}
}

func (c *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.deliveries
	ch <- c.relays
	ch <- c.pending
}

func (c *storeCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := c.st.Stats(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.deliveries, err)
		return
	}
	for _, s := range []store.DeliveryState{store.DeliveryQueued, store.DeliveryInFlight, store.DeliveryDelivered, store.DeliveryFailed} {
		ch <- prometheus.MustNewConstMetric(c.deliveries, prometheus.GaugeValue, float64(st.Deliveries[s]), string(s))
	}
	for _, s := range []store.RelayState{store.RelayQueued, store.RelaySending, store.RelaySent, store.RelayFailed} {
		ch <- prometheus.MustNewConstMetric(c.relays, prometheus.GaugeValue, float64(st.Relays[s]), string(s))
	}
	ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(st.SubmissionsPending))
}

// esroCollector exports esro.Endpoint.Stats as esro_* metrics.
type esroCollector struct {
	stats func() esro.Stats
	descs map[string]*prometheus.Desc
}

func newESROCollector(stats func() esro.Stats) *esroCollector {
	c := &esroCollector{stats: stats, descs: map[string]*prometheus.Desc{}}
	for name, help := range map[string]string{
		"datagrams_received_total": "Datagrams received.",
		"datagrams_sent_total":     "Datagrams sent.",
		"bytes_received_total":     "Octets received.",
		"bytes_sent_total":         "Octets sent.",
		"send_errors_total":        "Datagrams the socket refused to send.",
		"invokes_sent_total":       "Invocations started.",
		"invokes_received_total":   "Invocations given to handlers.",
		"results_received_total":   "RESULTs received.",
		"errors_received_total":    "ERRORs received.",
		"answers_sent_total":       "RESULTs and ERRORs sent.",
		"confirms_total":           "Answers confirmed (acknowledged or unchallenged).",
		"retransmissions_total":    "Timer-driven resends.",
		"duplicates_total":         "Duplicate PDUs absorbed or re-answered.",
		"superseded_total":         "Held invocations replaced by a new INVOKE on their number.",
		"reference_waits_total":    "Invocations that waited for a free reference number.",
		"withheld_total":           "Datagrams to unproven sources withheld by the amplification limit.",
		"withheld_bytes_total":     "Octets to unproven sources withheld by the amplification limit.",
		"unreachable_total":        "Invocations ended at once by an ICMP error (port or host unreachable).",
		"kernel_drops_total":       "Datagrams the kernel dropped for want of socket receive buffer.",
		"tombstones":               "Refused invocations of unproven sources remembered for duplicate detection.",
	} {
		c.descs[name] = prometheus.NewDesc("esro_"+name, help, nil, nil)
	}
	c.descs["retransmissions_deferred_total"] = prometheus.NewDesc("esro_retransmissions_deferred_total",
		"Retransmissions that waited for their turn under esro.retransmit_rate.", nil, nil)
	c.descs["drops_total"] = prometheus.NewDesc("esro_drops_total", "Datagrams dropped, by reason.", []string{"reason"}, nil)
	c.descs["failures_total"] = prometheus.NewDesc("esro_failures_total",
		"Failures by direction (sent, received, local) and reason value.", []string{"direction", "reason"}, nil)
	c.descs["in_flight"] = prometheus.NewDesc("esro_in_flight",
		"Invocations held, by role; unproven: performer invocations of unproven sources among them.", []string{"role"}, nil)
	return c
}

func (c *esroCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c *esroCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	counter := func(name string, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.descs[name], prometheus.CounterValue, float64(v), labels...)
	}
	counter("datagrams_received_total", st.DatagramsReceived)
	counter("datagrams_sent_total", st.DatagramsSent)
	counter("bytes_received_total", st.BytesReceived)
	counter("bytes_sent_total", st.BytesSent)
	counter("send_errors_total", st.SendErrors)
	counter("invokes_sent_total", st.InvokesSent)
	counter("invokes_received_total", st.InvokesReceived)
	counter("results_received_total", st.ResultsReceived)
	counter("errors_received_total", st.ErrorsReceived)
	counter("answers_sent_total", st.AnswersSent)
	counter("confirms_total", st.Confirms)
	counter("retransmissions_total", st.Retransmissions)
	counter("retransmissions_deferred_total", st.RetransmissionsDeferred)
	counter("duplicates_total", st.DuplicatesIn)
	counter("superseded_total", st.Superseded)
	counter("reference_waits_total", st.ReferenceWaits)
	counter("withheld_total", st.Withheld)
	counter("withheld_bytes_total", st.WithheldBytes)
	counter("unreachable_total", st.Unreachable)
	counter("kernel_drops_total", st.KernelDrops)
	ch <- prometheus.MustNewConstMetric(c.descs["tombstones"], prometheus.GaugeValue, float64(st.Tombstones))
	ch <- prometheus.MustNewConstMetric(c.descs["in_flight"], prometheus.GaugeValue, float64(st.InFlightUnproven), "unproven")
	for i, v := range st.Drops {
		counter("drops_total", v, esro.DropReason(i).String())
	}
	reason := func(i int) string {
		if i > int(esro.RemoteResource) {
			return "other" // Unreachable among them
		}
		return strconv.Itoa(i)
	}
	for i := range st.FailuresSent {
		counter("failures_total", st.FailuresSent[i], "sent", reason(i))
		counter("failures_total", st.FailuresReceived[i], "received", reason(i))
		counter("failures_total", st.LocalFailures[i], "local", reason(i))
	}
	ch <- prometheus.MustNewConstMetric(c.descs["in_flight"], prometheus.GaugeValue, float64(st.InFlightInvoker), "invoker")
	ch <- prometheus.MustNewConstMetric(c.descs["in_flight"], prometheus.GaugeValue, float64(st.InFlightPerformer), "performer")
}
