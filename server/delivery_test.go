package server

import (
	"bytes"
	"context"
	"errors"
	"net/mail"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
	"github.com/esro-emsdp/emsdp/ua"
)

func inboundMsg(to, subject, body string) string {
	return "From: Carol <carol@example.com>\r\nTo: " + to + "\r\nSubject: " + subject +
		"\r\nMessage-ID: <" + strings.ReplaceAll(subject, " ", "-") + "@example.com>\r\n\r\n" + body + "\r\n"
}

// Delivery control (docs/protocol.md EMSD §9.12 Recommend): the limits are honoured
// for later deliveries, the result says what is held back and why, and
// restrict remove lifts them.
func TestDeliveryControl(t *testing.T) {
	s := startServer(t, testConfig(t))
	dev := newDevice(t, s, 198036, deviceOpts{})
	ctx := context.Background()
	max := uint32(200)
	res, err := dev.ua.DeliveryControl(ctx, &emsd.DeliveryControlArgument{PermissibleMaxContentLength: &max})
	must(t, err)
	if res.WaitingOperations != nil || len(res.WaitingContentTypes) != 0 {
		t.Errorf("nothing held yet, result %+v", res)
	}
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "big", strings.Repeat("long text ", 100))))
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "small", "short")))
	if del := dev.next(t); del.IPM.Heading.Subject != "small" {
		t.Errorf("first delivery %q, want the small one", del.IPM.Heading.Subject)
	}
	dev.none(t, 300*time.Millisecond)

	res, err = dev.ua.DeliveryControl(ctx, nil) // restrict update, nothing changed
	must(t, err)
	if res.WaitingOperations == nil || !res.WaitingOperations.Has(emsd.OpDelivery) ||
		res.WaitingMessages == nil || !res.WaitingMessages.Has(emsd.WaitingLongContent) || res.WaitingMessages.Has(emsd.WaitingLowPriority) ||
		len(res.WaitingContentTypes) != 1 || res.WaitingContentTypes[0] != emsd.ContentIPM {
		t.Errorf("held big message: result %+v", res)
	}
	remove := emsd.RestrictRemove
	_, err = dev.ua.DeliveryControl(ctx, &emsd.DeliveryControlArgument{Restrict: &remove})
	must(t, err)
	if del := dev.next(t); del.IPM.Heading.Subject != "big" {
		t.Errorf("after remove: %q", del.IPM.Heading.Subject)
	}
	d, err := s.st.Device(ctx, 198036)
	must(t, err)
	if d.Control != (store.DeliveryControl{}) {
		t.Errorf("limits after remove: %+v", d.Control)
	}
	// Lowest priority: a non-urgent message waits.
	urgent := emsd.PriorityUrgent
	res, err = dev.ua.DeliveryControl(ctx, &emsd.DeliveryControlArgument{PermissibleLowestPriority: &urgent})
	must(t, err)
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "normal", "n")))
	dev.none(t, 300*time.Millisecond)
	res, err = dev.ua.DeliveryControl(ctx, nil)
	must(t, err)
	if res.WaitingMessages == nil || !res.WaitingMessages.Has(emsd.WaitingLowPriority) {
		t.Errorf("held normal message: %+v", res)
	}
}

// A device that is off-line gets its delivery when it polls: any INVOKE
// wakes its queue (docs/protocol.md EMSD §9.4), long before the retry time.
func TestPollWakesQueue(t *testing.T) {
	c := testConfig(t)
	c.Delivery.Retry = []Duration{Duration(time.Hour)}
	s := startServer(t, c)
	ap, online := offlineUDP(t, "127.0.0.1")
	addDevice(t, s, 198036, ap, deviceOpts{}) // off-line: the first attempt ends in an ESRO failure

	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "queued", "q")))
	eventually(t, "delivery respooled", func() bool {
		return s.metrics.counter(t, "emsd_deliveries_total", "deferred") >= 1
	})
	// The device comes back on the same port and polls.
	ep2, err := esro.NewEndpoint(online(s.Addrs().EMSD), &esro.Config{Timers: fastTimers})
	must(t, err)
	defer ep2.Close()
	got := make(chan *ua.Delivery, 1)
	cl, err := ua.New(ep2, ua.Config{Server: s.Addrs().EMSD, Address: 198036,
		Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil })})
	must(t, err)
	defer cl.Close()
	start := time.Now()
	_, err = cl.DeliveryControl(context.Background(), nil)
	must(t, err)
	select {
	case d := <-got:
		if d.IPM.Heading.Subject != "queued" {
			t.Errorf("got %q", d.IPM.Heading.Subject)
		}
		if time.Since(start) > 5*time.Second {
			t.Errorf("delivery %v after the poll", time.Since(start))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("poll did not wake the queue")
	}
}

// Delivery outcomes (docs/protocol.md EMSD §9.9): ERROR with parameter 6 is
// retried; any other ERROR is a non-delivery, reported to the Internet
// sender as a DSN and to a device originator as a report.
func TestDeliveryErrors(t *testing.T) {
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)

	// A device that is busy twice (its handler fails: ERROR 6), then takes it.
	var fails atomic.Int32
	got := make(chan *ua.Delivery, 1)
	newDevice(t, s, 198036, deviceOpts{handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error {
		if fails.Add(1) <= 2 {
			return errors.New("disk full")
		}
		got <- d
		return nil
	})})
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "retried", "r")))
	select {
	case d := <-got:
		if d.IPM.Heading.Subject != "retried" {
			t.Errorf("got %q", d.IPM.Heading.Subject)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery after transient errors")
	}
	if n := fails.Load(); n != 3 {
		t.Errorf("%d attempts, want 3", n)
	}

	// A device that refuses everything with ERROR 7.
	refuser := listenESRO(t, "127.0.0.1")
	refusedID := make(chan emsd.MessageID, 10)
	must(t, refuser.HandleFunc(3, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		if _, arg, err := emsd.StripInstanceID(emsd.Operation(inv.Operation), inv.Data); err == nil {
			var a emsd.DeliverArgument
			if a.Unmarshal(arg, emsd.Options{}) == nil {
				refusedID <- a.MessageID
			}
		}
		w.Error(esro.EncodingBER, 7, unhex("020107"))
	}))
	addDevice(t, s, 198037, epAddr(refuser), deviceOpts{})
	must(t, sendMail(s, "carol@example.com", []string{"198.037@emsd.test"}, inboundMsg("198.037@emsd.test", "refused", "x")))
	m := host.next(t)
	if m.from != "" || len(m.to) != 1 || m.to[0] != "carol@example.com" {
		t.Errorf("DSN envelope from %q to %v", m.from, m.to)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(m.data))
	must(t, err)
	if ct := msg.Header.Get("Content-Type"); !strings.HasPrefix(ct, "multipart/report") || !bytes.Contains(m.data, []byte("Action: failed")) ||
		!bytes.Contains(m.data, []byte("198.037@emsd.test")) || !bytes.Contains(m.data, []byte("Subject: refused")) {
		t.Errorf("DSN:\n%s", m.data)
	}
	// The status is kept under the id the delivery carried: the server's
	// own, not the sender's Message-ID.
	delivered := <-refusedID
	if !delivered.IsLocal {
		t.Errorf("delivered under %s, want a local id", delivered)
	}
	st, err := s.st.DeliveryStatus(context.Background(), 198037, storedid.MessageID(delivered).String())
	must(t, err)
	if st != uint8(emsd.NonDeliveryReportSent) {
		t.Errorf("status %d, want 3", st)
	}

	// A device originator asked for non-delivery reports (bit 5, set by
	// the UA on every recipient): it gets one, as a notice.
	sender := newDevice(t, s, 198038, deviceOpts{})
	id, err := sender.ua.Submit(context.Background(), &ua.Message{To: []string{"198.037"}, Subject: "to refuser", Body: []byte("x\n")})
	must(t, err)
	n := sender.next(t)
	if n.IPM.Heading.Subject != "Non-delivery report" || !strings.Contains(string(n.IPM.Body.Text), id.String()) ||
		!strings.Contains(string(n.IPM.Body.Text), "198.037") {
		t.Errorf("notice %q:\n%s", n.IPM.Heading.Subject, n.IPM.Body.Text)
	}
}

// Reports as EMSD ReportDelivery (content type 2) to a device that takes
// them; with reports = "auto" a device refusing them gets a notice.
func TestReportDelivery(t *testing.T) {
	s := startServer(t, testConfig(t))
	refuser := listenESRO(t, "127.0.0.1")
	must(t, refuser.HandleFunc(3, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, _ *esro.Invocation) {
		w.Error(esro.EncodingBER, 7, nil)
	}))
	addDevice(t, s, 198037, epAddr(refuser), deviceOpts{})
	// The originator takes content type 2 (a raw performer).
	orig, reports := reportTaker(t, s, 198036)
	arg := submitArg(t, nil, emsd.ContentIPM, testIPM("198.037"), emsd.Options{})
	res, err := orig.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: 5, Operation: 33,
		Handshake: esro.ThreeWay, Data: emsd.PrependInstanceID(0, arg)})
	must(t, err)
	var sr emsd.SubmitResult
	must(t, sr.Unmarshal(res.Data, emsd.Options{}))
	select {
	case da := <-reports:
		if da.ContentType != emsd.ContentDeliveryReport {
			t.Fatalf("content type %d", da.ContentType)
		}
		c, err := da.Content(emsd.Options{})
		must(t, err)
		rep := c.(*emsd.ReportDelivery)
		if rep.ReportedMessageID != (emsd.MessageID{IsLocal: true, Local: sr.MessageID}) || len(rep.Recipients) != 1 ||
			rep.Recipients[0].NonDelivery == nil || rep.Recipients[0].Recipient != emsd.LocalOR(198037, "") ||
			*rep.Recipients[0].NonDelivery.Diagnostic != emsd.DiagProtocolViolation {
			t.Errorf("report %+v", rep)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no report")
	}
}

// A delivery that cannot be made within delivery.expiry is dropped with
// a non-delivery report (docs/protocol.md EMSD §9.8).
func TestDeliveryExpiry(t *testing.T) {
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	c.Delivery.Expiry = Duration(time.Second)
	s := startServer(t, c)
	ep := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198036, epAddr(ep), deviceOpts{})
	ep.Close()
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "late", "x")))
	m := host.next(t)
	if !bytes.Contains(m.data, []byte("Action: failed")) || !bytes.Contains(m.data, []byte("5.4.7")) {
		t.Errorf("expiry DSN:\n%s", m.data)
	}
	if s.metrics.counter(t, "emsd_deliveries_total", "expired") != 1 {
		t.Error("expiry not counted")
	}
}

// Relay outcomes per recipient: 5xx is a non-delivery reported to the
// device, 4xx is retried on the relay schedule.
func TestRelayOutcomes(t *testing.T) {
	host := startSmarthost(t, "")
	host.setRcptErr("bad@example.com", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"})
	host.setRcptErr("later@example.com", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"})
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{})
	_, err := dev.ua.Submit(context.Background(), &ua.Message{To: []string{"good@example.com", "bad@example.com", "later@example.com"},
		Subject: "mixed", Body: []byte("x\n")})
	must(t, err)
	if m := host.next(t); len(m.to) != 1 || m.to[0] != "good@example.com" {
		t.Errorf("first transaction to %v", m.to)
	}
	n := dev.next(t)
	if n.IPM.Heading.Subject != "Non-delivery report" || !strings.Contains(string(n.IPM.Body.Text), "bad@example.com") ||
		!strings.Contains(string(n.IPM.Body.Text), "no such user") {
		t.Errorf("notice:\n%s", n.IPM.Body.Text)
	}
	eventually(t, "a deferred relay", func() bool { return s.metrics.counter(t, "gateway_relay_total", "deferred") >= 1 })
	host.setRcptErr("later@example.com", nil)
	if m := host.next(t); len(m.to) != 1 || m.to[0] != "later@example.com" {
		t.Errorf("retry to %v", m.to)
	}
	dev.none(t, 200*time.Millisecond)
}

// A delivery to a device whose port is closed fails at once on the ICMP
// port unreachable, and counts as a failed attempt saying so.
func TestDeliveryUnreachable(t *testing.T) {
	c := testConfig(t)
	c.Delivery.Retry = []Duration{Duration(time.Hour)}
	s := startServer(t, c)
	gone := listenESRO(t, "127.0.0.1")
	ap := epAddr(gone)
	gone.Close()
	addDevice(t, s, 198036, ap, deviceOpts{})
	start := time.Now()
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "gone", "x")))
	var e store.QueueEntry
	deadline := time.Now().Add(20 * time.Second)
	for {
		l, err := s.st.ListQueue(context.Background(), store.QueueFilter{Device: 198036})
		must(t, err)
		// Attempts counts a claim; the error is recorded when the attempt ends.
		if len(l.Entries) == 1 && l.Entries[0].Attempts > 0 && l.Entries[0].LastError != "" {
			e = l.Entries[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no failed attempt: %+v", l.Entries)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Far below one retransmission of the test timers times their count.
	if d := time.Since(start); d > 10*time.Second || e.Attempts != 1 || !strings.Contains(e.LastError, "unreachable") {
		t.Fatalf("after %v: %d attempts, last error %q", d, e.Attempts, e.LastError)
	}
}
