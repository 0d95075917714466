package server

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"net/mail"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// summarizeWork describes the reports in w, one string per report: a
// device report "<device> <ct>: +rcpt -rcpt" (+ delivered, - not), a DSN
// "dsn <to>: <action> <rcpt>, ...".
func summarizeWork(t *testing.T, w store.Work) []string {
	t.Helper()
	var out []string
	for _, d := range w.Deliveries {
		var sign []string
		switch emsd.ContentType(d.ContentType) {
		case emsd.ContentDeliveryReport:
			var rep emsd.ReportDelivery
			must(t, rep.Unmarshal(d.Content, emsd.Options{}))
			for _, e := range rep.Recipients {
				if e.Delivery != nil {
					sign = append(sign, "+"+e.Recipient.String())
				} else {
					sign = append(sign, "-"+e.Recipient.String())
				}
			}
		case emsd.ContentIPM:
			var ipm emsd.IPM
			must(t, ipm.Unmarshal(d.Content, emsd.Options{}))
			for line := range strings.SplitSeq(string(ipm.Body.Text), "\n") {
				if a, _, ok := strings.Cut(line, ": delivered at"); ok {
					sign = append(sign, "+"+strings.TrimSpace(a))
				} else if a, _, ok := strings.Cut(line, ": relayed to the Internet at"); ok {
					sign = append(sign, "+"+strings.TrimSpace(a))
				} else if a, _, ok := strings.Cut(line, ": could not be delivered"); ok {
					sign = append(sign, "-"+strings.TrimSpace(a))
				}
			}
		}
		out = append(out, fmt.Sprintf("%s %d: %s", emsd.Address(d.Device), d.ContentType, strings.Join(sign, " ")))
	}
	for _, r := range w.Relays {
		msg, err := mail.ReadMessage(bytes.NewReader(r.Message))
		must(t, err)
		var blocks []string
		var rcpt string
		for line := range strings.SplitSeq(string(r.Message), "\r\n") {
			if v, ok := strings.CutPrefix(line, "Final-Recipient: rfc822; "); ok {
				rcpt = v
			}
			if v, ok := strings.CutPrefix(line, "Action: "); ok {
				blocks = append(blocks, v+" "+rcpt)
			}
		}
		if r.From != "" || len(r.Recipients) != 1 || r.Recipients[0].Addr != msg.Header.Get("To") {
			t.Errorf("DSN envelope from %q to %v, To: %q", r.From, r.Recipients, msg.Header.Get("To"))
		}
		out = append(out, fmt.Sprintf("dsn %s: %s", msg.Header.Get("To"), strings.Join(blocks, ", ")))
	}
	return out
}

// Outcomes known together are reported together: one report per
// (message, originator), listing the recipients whose flags ask for it
// (docs/protocol.md EMSD §9.10, Open Point 17; RFC 3464 §2.3).
func TestReportWorkGroups(t *testing.T) {
	const (
		ndr  = uint8(emsd.RcptNonDeliveryReport)
		dr   = uint8(emsd.RcptDeliveryReport)
		both = ndr | dr
	)
	msg1 := storedid.MessageID(emsd.LocalID(0x6b07e3fe, 1)).String()
	msg2 := storedid.MessageID(emsd.LocalID(0x6b07e3fe, 2)).String()
	fromDev := func(dev uint32, msg string, flags uint8, rcpt string) store.Report {
		return store.Report{Device: dev, Flags: flags, MessageID: msg, Recipient: storedid.Address(emsd.RFC822OR(rcpt)).String()}
	}
	fromMail := func(sender, msg string, flags uint8, rcpt string) store.Report {
		return store.Report{Mail: sender, Flags: flags, MessageID: msg, Recipient: "R:" + rcpt,
			Headers: []byte("Subject: original\r\n\r\n")}
	}
	ok := outcome{delivered: true}
	refused := failed(emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown, "550 5.1.1 no such user")
	tests := []struct {
		name    string
		reports string // delivery.reports
		items   []reportItem
		want    []string
	}{
		{"three refused, one report", "report", []reportItem{
			{fromDev(198036, msg1, ndr, "a@example.com"), refused},
			{fromDev(198036, msg1, ndr, "b@example.com"), refused},
			{fromDev(198036, msg1, ndr, "c@example.com"), refused},
		}, []string{"198.036 2: -a@example.com -b@example.com -c@example.com"}},
		{"mixed outcomes", "report", []reportItem{
			{fromDev(198036, msg1, both, "a@example.com"), ok},
			{fromDev(198036, msg1, ndr, "b@example.com"), refused},
			{fromDev(198036, msg1, ndr, "c@example.com"), refused},
		}, []string{"198.036 2: +a@example.com -b@example.com -c@example.com"}},
		{"per-recipient flags", "report", []reportItem{
			{fromDev(198036, msg1, ndr, "delivered-no-dr@example.com"), ok},
			{fromDev(198036, msg1, dr, "refused-no-ndr@example.com"), refused},
			{fromDev(198036, msg1, ndr, "refused@example.com"), refused},
			{fromDev(198036, msg1, dr, "delivered@example.com"), ok},
		}, []string{"198.036 2: -refused@example.com +delivered@example.com"}},
		{"nothing asked", "report", []reportItem{
			{fromDev(198036, msg1, 0, "a@example.com"), refused},
			{fromDev(198036, msg1, ndr, "b@example.com"), ok},
		}, nil},
		{"two messages, two originators", "report", []reportItem{
			{fromDev(198036, msg1, ndr, "a@example.com"), refused},
			{fromDev(198037, msg1, ndr, "b@example.com"), refused},
			{fromDev(198036, msg2, ndr, "c@example.com"), refused},
			{fromDev(198036, msg1, ndr, "d@example.com"), refused},
		}, []string{"198.036 2: -a@example.com -d@example.com", "198.037 2: -b@example.com", "198.036 2: -c@example.com"}},
		{"notices", "ipm", []reportItem{
			{fromDev(198036, msg1, both, "a@example.com"), ok},
			{fromDev(198036, msg1, ndr, "b@example.com"), refused},
			{fromDev(198036, msg1, ndr, "c@example.com"), refused},
		}, []string{"198.036 32: +a@example.com -b@example.com -c@example.com"}},
		{"DSN with a block per recipient", "report", []reportItem{
			{fromMail("carol@example.com", "R:<m1@example.com>", 0, "a@example.net"), refused},
			{fromMail("carol@example.com", "R:<m1@example.com>", 0, "b@example.net"), refused},
			{fromMail("carol@example.com", "R:<m1@example.com>", 0, "c@example.net"), refused},
		}, []string{"dsn carol@example.com: failed a@example.net, failed b@example.net, failed c@example.net"}},
		{"DSN: success only when asked", "report", []reportItem{
			{fromMail("carol@example.com", "R:<m1@example.com>", 0, "a@example.net"), ok},
			{fromMail("carol@example.com", "R:<m1@example.com>", dr, "b@example.net"), ok},
			{fromMail("carol@example.com", "R:<m1@example.com>", 0, "c@example.net"), refused},
		}, []string{"dsn carol@example.com: delivered b@example.net, failed c@example.net"}},
		{"DSN per sender and message", "report", []reportItem{
			{fromMail("carol@example.com", "R:<m1@example.com>", 0, "a@example.net"), refused},
			{fromMail("dave@example.com", "R:<m1@example.com>", 0, "b@example.net"), refused},
			{fromMail("carol@example.com", "R:<m2@example.com>", 0, "c@example.net"), refused},
		}, []string{"dsn carol@example.com: failed a@example.net", "dsn dave@example.com: failed b@example.net",
			"dsn carol@example.com: failed c@example.net"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testConfig(t)
			c.SMTP.Listen = ""
			c.Delivery.Reports = tt.reports
			s := startServer(t, c)
			w, err := s.rep.reportWork(context.Background(), tt.items)
			must(t, err)
			if got := summarizeWork(t, w); !slices.Equal(got, tt.want) {
				t.Errorf("reports\n got %q\nwant %q", got, tt.want)
			}
			if n := s.metrics.counter(t, "emsd_reports_total", "emsd") + s.metrics.counter(t, "emsd_reports_total", "notice") +
				s.metrics.counter(t, "emsd_reports_total", "dsn"); int(n) != len(tt.want) {
				t.Errorf("%v reports counted, want %d", n, len(tt.want))
			}
		})
	}
}

// Many recipients are split into as few reports as the device takes:
// each at most 256 entries, one segment at the PDU size in the device's
// protocol version, and within its max-content-length (packReports).
func TestReportSplit(t *testing.T) {
	long := strings.Repeat("x", 100)
	tests := []struct {
		name       string
		n          int
		pdu        int
		version    emsd.Version
		maxLen     uint32 // device's max-content-length; 0 = none
		reports    string
		rcpt       func(i int) string
		text       string
		wantSplits bool
	}{
		{"few fit one", 3, 1500, emsd.V1_1, 0, "report", shortRcpt, "refused", false},
		{"many long", 40, 1500, emsd.V1_1, 0, "report", longRcpt, "550 " + long, true},
		{"small PDU", 10, 256, emsd.V1_1, 0, "report", shortRcpt, "550 " + long, true},
		{"version 1.0", 40, 1500, emsd.V1_0, 0, "report", longRcpt, "550 " + long, true},
		{"max content length", 10, 1500, emsd.V1_1, 300, "report", shortRcpt, "550 " + long, true},
		{"entry limit", 300, 65000, emsd.V1_1, 0, "report", func(i int) string { return fmt.Sprintf("%d@x.y", i) }, "", true},
		{"notices", 40, 1500, emsd.V1_1, 0, "ipm", longRcpt, "550 " + long, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testConfig(t)
			c.SMTP.Listen = ""
			c.EMSD.PDUSize = tt.pdu
			c.Delivery.Reports = tt.reports
			s := startServer(t, c)
			ctx := context.Background()
			addDevice(t, s, 198036, netip.MustParseAddrPort("127.0.0.1:9"), deviceOpts{version: tt.version})
			if tt.maxLen != 0 {
				must(t, s.st.SetDeliveryControl(ctx, 198036, store.DeliveryControl{MaxContentLength: &tt.maxLen}))
				must(t, s.Reload(ctx))
			}
			var items []reportItem
			var want []string
			for i := range tt.n {
				r := tt.rcpt(i)
				items = append(items, reportItem{store.Report{Device: 198036, Flags: uint8(emsd.RcptNonDeliveryReport),
					MessageID: storedid.MessageID(emsd.LocalID(0x6b07e3fe, 1)).String(), Recipient: storedid.Address(emsd.RFC822OR(r)).String()},
					failed(emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown, tt.text)})
				want = append(want, "-"+r)
			}
			w, err := s.rep.reportWork(ctx, items)
			must(t, err)
			t.Logf("%d entries in %d reports", tt.n, len(w.Deliveries))
			if len(w.Deliveries) > 1 != tt.wantSplits {
				t.Errorf("%d reports, want splits %v", len(w.Deliveries), tt.wantSplits)
			}
			// Together they list every recipient once, in order.
			var got []string
			sums := summarizeWork(t, w)
			for _, sum := range sums {
				_, list, _ := strings.Cut(sum, ": ")
				got = append(got, strings.Fields(list)...)
			}
			if !slices.Equal(got, want) {
				t.Errorf("entries\n got %q\nwant %q", got, want)
			}
			// The rule of packReports, measured independently: one segment
			// with the largest envelope a report delivery can have.
			o := s.conf().emsdOptions(tt.version)
			sp := emsd.Splitter{Options: o, MaxUserData: tt.pdu}
			env := func(ct emsd.ContentType) *emsd.DeliverArgument {
				return &emsd.DeliverArgument{MessageID: emsd.LocalID(math.MaxUint32, math.MaxUint32),
					DeliveryTime: math.MaxUint32, ContentType: ct}
			}
			fitsContent := func(ct emsd.ContentType, stored []byte) bool {
				c, err := emsd.DecodeContents(ct, stored, emsd.Options{})
				must(t, err)
				wire, err := c.Marshal(o)
				must(t, err)
				segs, err := sp.SplitDeliver(env(ct), wire, 1)
				return err == nil && len(segs) == 1 && (tt.maxLen == 0 || len(stored) <= int(tt.maxLen))
			}
			form := asReport
			if tt.reports == "ipm" {
				form = s.rep.asNotice(198036)
			}
			fits := func(part []reportItem) bool {
				rep := &emsd.ReportDelivery{ReportedMessageID: emsd.LocalID(0x6b07e3fe, 1)}
				for _, it := range part {
					rep.Recipients = append(rep.Recipients, reportEntry(it.r, it.o))
				}
				if len(rep.Recipients) > emsd.MaxRecipients {
					return false
				}
				c := form(rep)
				stored, err := c.Marshal(emsd.Options{})
				must(t, err)
				return fitsContent(c.ContentType(), stored)
			}
			off := 0
			for i, d := range w.Deliveries {
				_, list, _ := strings.Cut(sums[i], ": ")
				n := len(strings.Fields(list))
				if n > 1 && !fitsContent(emsd.ContentType(d.ContentType), d.Content) || n > emsd.MaxRecipients {
					t.Errorf("report %d with %d entries does not fit the device", i, n)
				}
				// As few as fit: the next report's first entry would not
				// have fitted into this one.
				if off+n < len(items) && fits(items[off:off+n+1]) {
					t.Errorf("report %d (%d entries) split too early", i, n)
				}
				off += n
			}
		})
	}
}

func shortRcpt(i int) string { return fmt.Sprintf("user%d@example.com", i) }

func longRcpt(i int) string {
	return fmt.Sprintf("a-rather-long-mailbox-name-%03d@some.long.domain.example.com", i)
}

// reportTaker is an originator device that takes reports (content type
// 2), as a raw ESRO performer: it records every DeliverArgument.
func reportTaker(t *testing.T, s *Server, addr emsd.Address) (*esro.Endpoint, chan *emsd.DeliverArgument) {
	t.Helper()
	ep := listenESRO(t, "127.0.0.1")
	got := make(chan *emsd.DeliverArgument, 16)
	must(t, ep.HandleFunc(3, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		_, arg, _ := emsd.StripInstanceID(emsd.Operation(inv.Operation), inv.Data)
		var da emsd.DeliverArgument
		if err := da.Unmarshal(arg, emsd.Options{}); err == nil {
			got <- &da
		}
		w.Result(esro.EncodingBER, nil)
	}))
	addDevice(t, s, addr, epAddr(ep), deviceOpts{})
	return ep, got
}

// submitRaw submits ipm from ep and returns the local id the server gave.
func submitRaw(t *testing.T, s *Server, ep *esro.Endpoint, ipm *emsd.IPM) emsd.MessageID {
	t.Helper()
	res, err := ep.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: 5, Operation: 33,
		Handshake: esro.ThreeWay, Data: emsd.PrependInstanceID(0, submitArg(t, nil, emsd.ContentIPM, ipm, emsd.Options{}))})
	must(t, err)
	var sr emsd.SubmitResult
	must(t, sr.Unmarshal(res.Data, emsd.Options{}))
	return emsd.MessageID{IsLocal: true, Local: sr.MessageID}
}

func nextReport(t *testing.T, got chan *emsd.DeliverArgument) *emsd.ReportDelivery {
	t.Helper()
	select {
	case da := <-got:
		if da.ContentType != emsd.ContentDeliveryReport {
			t.Fatalf("content type %d, want a report", da.ContentType)
		}
		c, err := da.Content(emsd.Options{})
		must(t, err)
		return c.(*emsd.ReportDelivery)
	case <-time.After(15 * time.Second):
		t.Fatal("no report")
		return nil
	}
}

// entryList describes a report's entries: "+rcpt" delivered, "-rcpt/diag"
// not delivered.
func entryList(rep *emsd.ReportDelivery) []string {
	var out []string
	for _, e := range rep.Recipients {
		switch {
		case e.Delivery != nil:
			out = append(out, "+"+e.Recipient.String())
		case e.NonDelivery != nil && e.NonDelivery.Diagnostic != nil:
			out = append(out, fmt.Sprintf("-%s/%d", e.Recipient, *e.NonDelivery.Diagnostic))
		default:
			out = append(out, "-"+e.Recipient.String())
		}
	}
	return out
}

// One relay round: the recipients of a message the smarthost settles in
// one transaction make one report to the device originator, whatever
// their outcomes, listing those whose flags ask for it.
func TestRelayRoundOneReport(t *testing.T) {
	noUser := &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	unknown := fmt.Sprintf("/%d", emsd.DiagRecipientUnknown)
	tests := []struct {
		name    string
		rcpts   map[string]emsd.PerRecipientFlags // in IPM order below
		order   []string
		refused []string
		want    []string
	}{
		{"all refused",
			map[string]emsd.PerRecipientFlags{"a@example.com": emsd.RcptNonDeliveryReport,
				"b@example.com": emsd.RcptNonDeliveryReport, "c@example.com": emsd.RcptNonDeliveryReport},
			[]string{"a@example.com", "b@example.com", "c@example.com"},
			[]string{"a@example.com", "b@example.com", "c@example.com"},
			[]string{"-a@example.com" + unknown, "-b@example.com" + unknown, "-c@example.com" + unknown}},
		{"one sent with a delivery report, two refused",
			map[string]emsd.PerRecipientFlags{"good@example.com": emsd.RcptDeliveryReport | emsd.RcptNonDeliveryReport,
				"b@example.com": emsd.RcptNonDeliveryReport, "c@example.com": emsd.RcptNonDeliveryReport},
			[]string{"b@example.com", "good@example.com", "c@example.com"},
			[]string{"b@example.com", "c@example.com"},
			[]string{"-b@example.com" + unknown, "+good@example.com", "-c@example.com" + unknown}},
		{"one refused without asking",
			map[string]emsd.PerRecipientFlags{"a@example.com": 0,
				"b@example.com": emsd.RcptNonDeliveryReport, "good@example.com": emsd.RcptNonDeliveryReport},
			[]string{"a@example.com", "b@example.com", "good@example.com"},
			[]string{"a@example.com", "b@example.com"},
			[]string{"-b@example.com" + unknown}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host := startSmarthost(t, "")
			for _, r := range tt.refused {
				host.setRcptErr(r, noUser)
			}
			c := testConfig(t)
			c.Relay.Smarthost = host.addr
			s := startServer(t, c)
			ep, got := reportTaker(t, s, 198036)
			ipm := testIPM()
			for _, r := range tt.order {
				ipm.Heading.Recipients = append(ipm.Heading.Recipients, emsd.RecipientData{Recipient: emsd.RFC822OR(r),
					Flags: tt.rcpts[r]})
			}
			id := submitRaw(t, s, ep, ipm)
			rep := nextReport(t, got)
			if rep.ReportedMessageID != id {
				t.Errorf("reported id %v, want %v", rep.ReportedMessageID, id)
			}
			if l := entryList(rep); !slices.Equal(l, tt.want) {
				t.Errorf("entries\n got %q\nwant %q", l, tt.want)
			}
			// Every report of the round was queued in the transaction that
			// produced this one: it is the only one.
			if n := s.metrics.counter(t, "emsd_reports_total", "emsd"); n != 1 {
				t.Errorf("%v reports, want 1", n)
			}
			st := queueStats(t, s)
			if n := st.Deliveries[store.DeliveryQueued] + st.Deliveries[store.DeliveryInFlight] +
				st.Deliveries[store.DeliveryDelivered] + st.Deliveries[store.DeliveryFailed]; n != 1 {
				t.Errorf("%d deliveries, want the one report: %v", n, st.Deliveries)
			}
		})
	}
}

// A device that takes only IPMs (the ua package) gets the round's one
// report as one notice listing every refused recipient.
func TestRelayRoundOneNotice(t *testing.T) {
	noUser := &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	host := startSmarthost(t, "")
	rcpts := []string{"a@example.com", "b@example.com", "c@example.com"}
	for _, r := range rcpts {
		host.setRcptErr(r, noUser)
	}
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{})
	ep := dev.ep
	submitRaw(t, s, ep, testIPM(rcpts...))
	n := dev.next(t)
	body := string(n.IPM.Body.Text)
	for _, r := range rcpts {
		if strings.Count(body, r+": could not be delivered") != 1 {
			t.Errorf("notice does not list %s once:\n%s", r, body)
		}
	}
	if a, b := s.metrics.counter(t, "emsd_reports_total", "emsd"), s.metrics.counter(t, "emsd_reports_total", "notice"); a != 1 || b != 1 {
		t.Errorf("%v reports and %v notices, want 1 and 1", a, b)
	}
}

// The relayed copies of an Internet sender's message that the smarthost
// refuses make one DSN with a recipient block each (RFC 3464 §2.3). The
// server relays no SMTP mail itself today, so the copies are queued as the
// store keeps them.
func TestRelayRoundOneDSN(t *testing.T) {
	noUser := &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	host := startSmarthost(t, "")
	rcpts := []string{"a@example.net", "b@example.net", "c@example.net"}
	for _, r := range rcpts {
		host.setRcptErr(r, noUser)
	}
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)
	orig := "From: Carol <carol@example.com>\r\nSubject: to three\r\nMessage-ID: <three@example.com>\r\n\r\nhi\r\n"
	now := time.Now()
	nr := store.NewRelay{From: "carol@example.com", Message: []byte(orig), NextAttempt: now, Expires: now.Add(time.Hour)}
	for _, r := range rcpts {
		nr.Recipients = append(nr.Recipients, store.RelayRecipient{Addr: r, Report: store.Report{Mail: "carol@example.com",
			Recipient: "R:" + r, MessageID: "R:<three@example.com>", Headers: headerSection([]byte(orig))}})
	}
	w := store.Work{Relays: []store.NewRelay{nr}}
	must(t, s.st.Enqueue(context.Background(), w))
	s.sched.noteQueued(w)
	m := host.next(t)
	if m.from != "" || !slices.Equal(m.to, []string{"carol@example.com"}) {
		t.Fatalf("DSN envelope from %q to %v", m.from, m.to)
	}
	sum := summarizeWork(t, store.Work{Relays: []store.NewRelay{{Message: m.data, Recipients: []store.RelayRecipient{{Addr: "carol@example.com"}}}}})
	if want := []string{"dsn carol@example.com: failed a@example.net, failed b@example.net, failed c@example.net"}; !slices.Equal(sum, want) {
		t.Errorf("DSN %q, want %q:\n%s", sum, want, m.data)
	}
	if !bytes.Contains(m.data, []byte("Subject: to three")) || bytes.Count(m.data, []byte("Status: 5.1.1")) != 3 {
		t.Errorf("DSN:\n%s", m.data)
	}
	if n := s.metrics.counter(t, "emsd_reports_total", "dsn"); n != 1 {
		t.Errorf("%v DSNs, want 1", n)
	}
}

// Relay recipients of one message that expire in the same pass make one
// report.
func TestRelayExpiryOneReport(t *testing.T) {
	s := startServer(t, testConfig(t)) // no smarthost: the relays wait until they expire
	ep, got := reportTaker(t, s, 198036)
	id := submitRaw(t, s, ep, testIPM("a@example.com", "b@example.com", "c@example.com"))
	eventually(t, "relays queued", func() bool { return queueStats(t, s).Relays[store.RelayQueued] == 3 })
	// The expiry pass as the scheduler runs it, at a time past the expiry.
	s.relay.expire(time.Now().Add(time.Duration(s.conf().Relay.Expiry) + time.Minute))
	rep := nextReport(t, got)
	expired := fmt.Sprintf("/%d", emsd.DiagMaximumTimeExpired)
	if want := []string{"-a@example.com" + expired, "-b@example.com" + expired, "-c@example.com" + expired}; rep.ReportedMessageID != id ||
		!slices.Equal(entryList(rep), want) {
		t.Errorf("report on %v: %q, want on %v: %q", rep.ReportedMessageID, entryList(rep), id, want)
	}
	if n := s.metrics.counter(t, "emsd_reports_total", "emsd"); n != 1 {
		t.Errorf("%v reports, want 1", n)
	}
	if n := s.metrics.counter(t, "gateway_relay_total", "expired"); n != 3 {
		t.Errorf("%v expired, want 3", n)
	}
}

// Recipients refused at submission are reported together.
func TestSubmissionRefusalsOneReport(t *testing.T) {
	s := startServer(t, testConfig(t))
	ep, got := reportTaker(t, s, 198036)
	id := submitRaw(t, s, ep, testIPM("198.050", "198.051"))
	rep := nextReport(t, got)
	unknown := fmt.Sprintf("/%d", emsd.DiagRecipientUnknown)
	if want := []string{"-198.050" + unknown, "-198.051" + unknown}; rep.ReportedMessageID != id || !slices.Equal(entryList(rep), want) {
		t.Errorf("report on %v: %q, want on %v: %q", rep.ReportedMessageID, entryList(rep), id, want)
	}
	if n := s.metrics.counter(t, "emsd_reports_total", "emsd"); n != 1 {
		t.Errorf("%v reports, want 1", n)
	}
}
