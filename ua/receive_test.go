package ua

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
	"github.com/esro-emsdp/emsdp/ua/uatest"
)

func testIPM(subject string, body []byte) *emsd.IPM {
	return &emsd.IPM{
		Heading: emsd.Heading{
			Originator: emsd.RFC822OR("Alice Example <alice@example.com>"),
			Recipients: []emsd.RecipientData{{Recipient: emsd.LocalOR(198036, "")}},
			Subject:    subject,
		},
		Body: &emsd.Body{Text: body},
	}
}

func TestDeliver(t *testing.T) {
	m, d := udpPair(t, Config{})
	for i, tc := range []struct {
		name   string
		twoWay bool
		size   int
	}{
		{"3-way", false, 100},
		{"2-way", true, 100},
		{"3-way 10 KB", false, 10 << 10},
		{"2-way 10 KB", true, 10 << 10},
		{"3-way 40 KB", false, 40 << 10},
		{"2-way 40 KB", true, 40 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := bytes.Repeat([]byte(fmt.Sprintf("%s body line\n", tc.name)), tc.size)[:tc.size]
			id := emsd.RFC822ID(fmt.Sprintf("<msg%d@example.com>", i))
			if err := m.Deliver(t.Context(), d.addr, id, testIPM(tc.name, body), uatest.DeliverOptions{TwoWay: tc.twoWay}); err != nil {
				t.Fatal(err)
			}
			got := d.rec.deliveries()
			if len(got) != i+1 {
				t.Fatalf("%d deliveries", len(got))
			}
			g := got[i]
			if g.MessageID != id || g.IPM.Heading.Subject != tc.name || !bytes.Equal(g.IPM.Body.Text, body) ||
				g.Version != emsd.V1_1 || g.From != m.Addr() || g.SubmissionTime.IsZero() || g.DeliveryTime.IsZero() {
				t.Fatalf("delivery %+v", g)
			}
		})
	}
}

func deliverArg(t testing.TB, id string, seg *emsd.SegmentInfo, ct emsd.ContentType, contents []byte) []byte {
	t.Helper()
	a := emsd.DeliverArgument{MessageID: emsd.RFC822ID(id), DeliveryTime: 1795678741, Segment: seg, ContentType: ct, Contents: contents}
	b, err := a.Marshal(emsd.Options{})
	must(t, err)
	return b
}

func ipmBytes(t testing.TB, subject string) []byte {
	b, err := testIPM(subject, []byte("body\n")).Marshal(emsd.Options{})
	must(t, err)
	return b
}

// Duplicate window (§1.5): the same instance id twice is answered RESULT
// and delivered once; with the window off (reference MTS peers) twice.
func TestDuplicates(t *testing.T) {
	for _, off := range []bool{false, true} {
		t.Run(fmt.Sprint("window off=", off), func(t *testing.T) {
			m, d := udpPair(t, Config{NoDuplicateWindow: off})
			arg := deliverArg(t, "<dup@example.com>", nil, emsd.ContentIPM, ipmBytes(t, "dup"))
			for range 2 {
				res, err := m.Invoke(t.Context(), d.addr, emsd.SAPUAPerformer3Way, 35, 0, emsd.PrependInstanceID(5, arg))
				if err != nil || len(res.Data) != 0 {
					t.Fatalf("%v %v", res, err)
				}
			}
			want := 1
			if off {
				want = 2
			}
			if n := len(d.rec.deliveries()); n != want {
				t.Fatalf("%d deliveries, want %d", n, want)
			}
			// A different id is new; the id 128 apart clears 5 again.
			m.Invoke(t.Context(), d.addr, emsd.SAPUAPerformer2Way, 35, 0, emsd.PrependInstanceID(6, arg))
			m.Invoke(t.Context(), d.addr, emsd.SAPUAPerformer2Way, 35, 0, emsd.PrependInstanceID(133, arg))
			m.Invoke(t.Context(), d.addr, emsd.SAPUAPerformer2Way, 35, 0, emsd.PrependInstanceID(5, arg))
			if n := len(d.rec.deliveries()); n != want+3 {
				t.Fatalf("%d deliveries, want %d", n, want+3)
			}
		})
	}
}

// A handler error is a transient EMSD error (6, parameter 6) and leaves the
// instance id unseen, so that the MTS's re-invocation is delivered.
func TestHandlerError(t *testing.T) {
	m, d := udpPair(t, Config{})
	d.rec.mu.Lock()
	d.rec.fail = 1
	d.rec.mu.Unlock()
	data := emsd.PrependInstanceID(9, deliverArg(t, "<x@y>", nil, emsd.ContentIPM, ipmBytes(t, "retry")))
	_, err := m.Invoke(t.Context(), d.addr, emsd.SAPUAPerformer3Way, 35, 0, data)
	var er *esro.ErrorReply
	if !errors.As(err, &er) || er.Value != 6 || !bytes.Equal(er.Data, []byte{2, 1, 6}) {
		t.Fatalf("err %v", err)
	}
	if _, err := m.Invoke(t.Context(), d.addr, emsd.SAPUAPerformer3Way, 35, 0, data); err != nil {
		t.Fatal(err)
	}
	if got := d.rec.deliveries(); len(got) != 1 || got[0].IPM.Heading.Subject != "retry" {
		t.Fatalf("deliveries %v", got)
	}
}

// Every rejected INVOKE is answered ERROR 7 with ErrorParameter 7, as the
// reference UA does (§1.4, §8, §10.3, captured TV16).
func TestReceiveErrors(t *testing.T) {
	m, d := udpPair(t, Config{})
	ipm := ipmBytes(t, "s")
	first := deliverArg(t, "<seg@x>", &emsd.SegmentInfo{First: true, SequenceID: 40, Value: 2}, emsd.ContentIPM, ipm[:10])
	for _, tc := range []struct {
		name string
		sap  emsd.SAP
		op   uint8
		enc  esro.Encoding
		data []byte
		code uint8 // 0: RESULT
	}{
		{"submission control", 3, 4, 0, []byte{0x30, 0}, 7},
		{"op 36", 3, 36, 0, []byte{0x0e, 0x30, 0}, 7},
		{"get configuration", 7, 7, 0, []byte{0x30, 0}, 7},
		{"1.0 delivery on the 2-way SAP", 7, 1, 0, deliverArg(t, "<a@b>", nil, 32, ipm), 7},
		{"encoding 1", 3, 35, 1, emsd.PrependInstanceID(1, deliverArg(t, "<a@b>", nil, 32, ipm)), 7},
		{"no instance id", 3, 35, 0, nil, 7},
		{"garbage", 3, 35, 0, []byte{6, 0x30, 3, 0x99, 1, 0}, 7},
		{"report content", 3, 35, 0, emsd.PrependInstanceID(2, deliverArg(t, "<a@b>", nil, emsd.ContentDeliveryReport, []byte{0x30, 0})), 7},
		{"voice content", 3, 35, 0, emsd.PrependInstanceID(3, deliverArg(t, "<a@b>", nil, emsd.ContentVoice, ipm)), 7},
		{"bad IPM", 7, 35, 0, emsd.PrependInstanceID(4, deliverArg(t, "<a@b>", nil, 32, []byte{0x30, 2, 5, 0})), 7},
		{"other segment of unknown sequence", 3, 35, 0, emsd.PrependInstanceID(5, deliverArg(t, "<seg@x>", &emsd.SegmentInfo{SequenceID: 99, Value: 1}, 32, ipm)), 7},
		{"zero segments", 3, 35, 0, emsd.PrependInstanceID(6, deliverArg(t, "<seg@x>", &emsd.SegmentInfo{First: true, SequenceID: 41, Value: 0}, 32, ipm)), 7},
		{"33 segments", 3, 35, 0, emsd.PrependInstanceID(7, deliverArg(t, "<seg@x>", &emsd.SegmentInfo{First: true, SequenceID: 42, Value: 33}, 32, ipm)), 7},
		{"first segment", 3, 35, 0, emsd.PrependInstanceID(8, first), 0},
		{"segment number out of range", 3, 35, 0, emsd.PrependInstanceID(9, deliverArg(t, "<seg@x>", &emsd.SegmentInfo{SequenceID: 40, Value: 2}, 32, ipm[10:])), 7},
		{"segment 1", 3, 35, 0, emsd.PrependInstanceID(10, deliverArg(t, "<seg@x>", &emsd.SegmentInfo{SequenceID: 40, Value: 1}, 32, ipm[10:])), 0},
		{"segment 1 again, completed sequence", 3, 35, 0, emsd.PrependInstanceID(11, deliverArg(t, "<seg@x>", &emsd.SegmentInfo{SequenceID: 40, Value: 1}, 32, ipm[10:])), 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := m.Invoke(t.Context(), d.addr, tc.sap, tc.op, tc.enc, tc.data)
			if tc.code == 0 {
				if err != nil || len(res.Data) != 0 {
					t.Fatalf("%v %v, want an empty RESULT", res, err)
				}
				return
			}
			var er *esro.ErrorReply
			if !errors.As(err, &er) || er.Value != tc.code || !bytes.Equal(er.Data, []byte{2, 1, tc.code}) || er.Encoding != 0 {
				t.Fatalf("%v %v, want ERROR %d with parameter", res, err, tc.code)
			}
		})
	}
	// Only the two-segment message was delivered.
	if got := d.rec.deliveries(); len(got) != 1 || got[0].MessageID != emsd.RFC822ID("<seg@x>") || got[0].IPM.Heading.Subject != "s" {
		t.Fatalf("deliveries %v", got)
	}
	// A segment number over 31 and a duplicate segment.
	first2 := deliverArg(t, "<seg2@x>", &emsd.SegmentInfo{First: true, SequenceID: 50, Value: 3}, 32, ipm[:5])
	seg1 := deliverArg(t, "<seg2@x>", &emsd.SegmentInfo{SequenceID: 50, Value: 1}, 32, ipm[5:10])
	for i, step := range []struct {
		data []byte
		code uint8
	}{{first2, 0}, {seg1, 0}, {seg1, 7}, {deliverArg(t, "<seg2@x>", &emsd.SegmentInfo{SequenceID: 50, Value: 40}, 32, ipm[10:]), 7}} {
		_, err := m.Invoke(t.Context(), d.addr, 3, 35, 0, emsd.PrependInstanceID(uint8(20+i), step.data))
		var er *esro.ErrorReply
		if step.code == 0 && err != nil || step.code != 0 && (!errors.As(err, &er) || er.Value != step.code) {
			t.Fatalf("step %d: %v", i, err)
		}
	}
}

// Without a handler, deliveries are refused as transient (6) so the MTS
// keeps them; submission verify still works.
func TestNoHandler(t *testing.T) {
	m, d := udpPair(t, Config{Handler: HandlerFunc(func(context.Context, *Delivery) error { return nil })})
	d.Client.Close()
	c, err := New(d.ep, Config{Server: m.Addr(), Address: 198036})
	must(t, err)
	_, err = m.Invoke(t.Context(), d.addr, 3, 35, 0, emsd.PrependInstanceID(0, deliverArg(t, "<a@b>", nil, 32, ipmBytes(t, "x"))))
	var er *esro.ErrorReply
	if !errors.As(err, &er) || er.Value != 6 {
		t.Fatalf("err %v", err)
	}
	if _, err := New(d.ep, Config{}); !errors.Is(err, esro.ErrSAPBound) {
		t.Fatalf("second client on one endpoint: %v", err)
	}
	c.Close()
}

// Submission verify (§10.4): send (1) for an id in the verify list,
// compared case-insensitively in the UA string form; drop (2) otherwise.
func TestSubmissionVerify(t *testing.T) {
	m, d := udpPair(t, Config{})
	id, err := d.Submit(t.Context(), &Message{To: []string{"198.037"}, Body: []byte("x\n")})
	must(t, err)
	for _, tc := range []struct {
		id   emsd.MessageID
		want emsd.SubmissionStatus
	}{
		{emsd.MessageID{IsLocal: true, Local: id}, emsd.SendMessage},
		{emsd.RFC822ID(strings.ToUpper(id.String())), emsd.SendMessage},
		{emsd.MessageID{IsLocal: true, Local: emsd.LocalMessageID{SubmissionTime: id.SubmissionTime, Number: id.Number + 1}}, emsd.DropMessage},
		{emsd.RFC822ID("<other@example.com>"), emsd.DropMessage},
	} {
		got, err := m.SubmissionVerify(t.Context(), d.addr, tc.id)
		if err != nil || got != tc.want {
			t.Fatalf("%v: %v %v, want %v", tc.id, got, err, tc.want)
		}
	}
	// Only the five most recent are kept (§10.1).
	for range 5 {
		_, err := d.Submit(t.Context(), &Message{To: []string{"198.037"}, Body: []byte("x\n")})
		must(t, err)
	}
	if got, err := m.SubmissionVerify(t.Context(), d.addr, emsd.MessageID{IsLocal: true, Local: id}); err != nil || got != emsd.DropMessage {
		t.Fatalf("sixth most recent: %v %v", got, err)
	}
	// Undecodable argument.
	_, err = m.Invoke(t.Context(), d.addr, 7, 6, 0, []byte{0x30, 1, 0})
	var er *esro.ErrorReply
	if !errors.As(err, &er) || er.Value != 7 {
		t.Fatalf("bad verify argument: %v", err)
	}
}

func TestDeliveryControl(t *testing.T) {
	m, d := udpPair(t, Config{Password: "pw"})
	r, err := d.DeliveryControl(t.Context(), nil)
	if err != nil || r.WaitingOperations == nil || !r.WaitingOperations.Has(emsd.OpDelivery) {
		t.Fatalf("%+v %v", r, err)
	}
	m.SetReferenceControl(true)
	sec := m.Controls()[0].Security
	if sec == nil || sec.Address == nil || sec.Address.Address != 198036 || sec.Password != "pw" {
		t.Fatalf("delivery control credentials %+v", sec)
	}
	// A reference MTS answers ERROR 7 without parameter (§9.12).
	_, err = d.DeliveryControl(t.Context(), &emsd.DeliveryControlArgument{Restrict: ptr(emsd.RestrictUpdate)})
	var e *Error
	if !errors.As(err, &e) || e.Code != emsd.CodeProtocolViolation || e.Parameter != nil || e.Operation != emsd.OpDeliveryControl {
		t.Fatalf("err %v", err)
	}
	if e.Error() != "EMSD error 7 (protocol-violation) on delivery-control, no parameter" {
		t.Fatalf("message %q", e.Error())
	}
}

func TestDeliveryVerify(t *testing.T) {
	m, d := udpPair(t, Config{})
	id := emsd.RFC822ID("<in@example.com>")
	m.SetDeliveryStatus(id, emsd.DeliveryReportSent)
	for _, tc := range []struct {
		id   emsd.MessageID
		want emsd.DeliveryStatus
	}{{id, emsd.DeliveryReportSent}, {emsd.LocalID(1, 2), emsd.NoReportSent}} {
		got, err := d.DeliveryVerify(t.Context(), tc.id)
		if err != nil || got != tc.want {
			t.Fatalf("%v: %v %v", tc.id, got, err)
		}
	}
	// No server configured.
	c := &Client{cfg: Config{}}
	if _, err := c.DeliveryVerify(t.Context(), id); !errors.Is(err, ErrNoServer) {
		t.Fatalf("no server: %v", err)
	}
}

// Deliveries over a lossy network, some segmented, both handshakes: every
// message reaches the handler exactly once (§1.5: the MTS re-invokes a
// failed segment with the same instance id and the window absorbs what was
// already performed).
func TestDeliverLossyExactlyOnce(t *testing.T) {
	for _, twoWay := range []bool{false, true} {
		t.Run(fmt.Sprint("2-way=", twoWay), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				n := lossynet.New(lossynet.Config{Loss: 0.3, Duplicate: 0.1, Reorder: 0.1, Delay: 5 * time.Millisecond, MaxDelay: 200 * time.Millisecond, Seed: 11})
				md, err := NewMaildir(t.TempDir(), "emsd.example")
				must(t, err)
				rec := &recorder{}
				m, d := lossyPair(t, n, esro.ShippedTimers(), Config{Handler: HandlerFunc(func(ctx context.Context, dl *Delivery) error {
					if err := md.Deliver(ctx, dl); err != nil {
						return err
					}
					return rec.Deliver(ctx, dl)
				})})
				const total = 40
				for i := range total {
					size := 50 + i*200 // up to ~8 KB: unsegmented and segmented
					body := bytes.Repeat([]byte{'a' + byte(i%26)}, size)
					id := emsd.RFC822ID(fmt.Sprintf("<m%d@example.com>", i))
					if err := m.Deliver(t.Context(), d.addr, id, testIPM(fmt.Sprint(i), body), uatest.DeliverOptions{TwoWay: twoWay, Tries: 20}); err != nil {
						t.Fatalf("message %d: %v", i, err)
					}
				}
				seen := map[emsd.MessageID]int{}
				for _, g := range rec.deliveries() {
					seen[g.MessageID]++
				}
				files := maildirIDs(t, md.dir)
				for i := range total {
					id := fmt.Sprintf("<m%d@example.com>", i)
					if c := seen[emsd.RFC822ID(id)]; c != 1 {
						t.Fatalf("message %d delivered %d times", i, c)
					}
					if c := files[id]; c != 1 {
						t.Fatalf("message %d stored %d times", i, c)
					}
				}
				if len(d.rec.deliveries()) != 0 {
					t.Fatal("default handler used")
				}
				if s := n.Stats(); s.Lost == 0 || s.Duplicated == 0 {
					t.Fatalf("the network did not misbehave: %+v", s)
				}
			})
		})
	}
}

// EMSD 1.0 (§4): deliveries are op 1 on SAP 3 without instance id and in
// 1.0 encodings; submissions op 0 on SAP 5, answered with the reference's
// tag-25 SubmitResult.
func TestVersion10(t *testing.T) {
	m, d := udpPair(t, Config{Version: emsd.V1_0})
	o := emsd.Options{Version: emsd.V1_0}
	ipm, err := testIPM("old", []byte("1.0 body\n")).Marshal(o)
	must(t, err)
	st := emsd.Time(1795676400)
	arg, err := (&emsd.DeliverArgument{MessageID: emsd.RFC822ID("<old@x>"), DeliveryTime: 1795678741, SubmissionTime: &st,
		ContentType: emsd.ContentIPM, Contents: ipm}).Marshal(o)
	must(t, err)
	if _, err := m.Invoke(t.Context(), d.addr, emsd.SAPUAPerformer3Way, uint8(emsd.OpDeliveryV1_0), 0, arg); err != nil {
		t.Fatal(err)
	}
	if got := d.rec.deliveries(); len(got) != 1 || got[0].Version != emsd.V1_0 || got[0].IPM.Heading.Subject != "old" ||
		!got[0].SubmissionTime.Equal(st.UTC()) {
		t.Fatalf("deliveries %+v", got)
	}

	// A 1.0 MTS on a raw endpoint.
	mts, err := esro.NewEndpoint(mustListen(t), &esro.Config{Timers: fastTimers})
	must(t, err)
	defer mts.Close()
	got := make(chan *esro.Invocation, 1)
	must(t, mts.HandleFunc(5, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		got <- inv
		b, _ := (&emsd.SubmitResult{MessageID: emsd.LocalMessageID{SubmissionTime: 0x325d8221, Number: 1}}).Marshal(o)
		w.Result(0, b)
	}))
	old := newDevice(t, mustListen(t), fastTimers, Config{Server: mts.LocalAddr().(*net.UDPAddr).AddrPort(), Address: 198036, Version: emsd.V1_0})
	id, err := old.Submit(t.Context(), &Message{To: []string{"198.037"}, Subject: "s", Body: []byte("b\n")})
	if err != nil || id.String() != "325d8221.00000001" {
		t.Fatalf("%v %v", id, err)
	}
	inv := <-got
	var a emsd.SubmitArgument
	if inv.Operation != uint8(emsd.OpSubmissionV1_0) || a.Unmarshal(inv.Data, o) != nil {
		t.Fatalf("op %d data % x", inv.Operation, inv.Data)
	}
	if _, err := old.DeliveryVerify(t.Context(), emsd.RFC822ID("<a@b>")); !errors.Is(err, emsd.ErrBadVersion) {
		t.Fatalf("delivery verify in 1.0: %v", err)
	}
}

func mustListen(t *testing.T) net.PacketConn {
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	must(t, err)
	return c
}

// KeepPolling polls at once and then every interval (a NAT's binding stays
// open), reports each outcome, and ends with its context.
func TestKeepPolling(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := lossynet.New(lossynet.Config{Seed: 1})
		m, d := lossyPair(t, n, fastTimers, Config{Password: "pw"})
		ctx, cancel := context.WithCancel(t.Context())
		var mu sync.Mutex
		var outcomes []error
		done := make(chan error, 1)
		start := time.Now()
		go func() {
			done <- d.KeepPolling(ctx, 10*time.Second, func(err error) {
				mu.Lock()
				outcomes = append(outcomes, err)
				mu.Unlock()
			})
		}()
		time.Sleep(35 * time.Second) // polls at 0, 10, 20 and 30 s
		synctest.Wait()
		if got := len(m.Controls()); got != 4 {
			t.Errorf("%d polls in %v, want 4", got, time.Since(start))
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("KeepPolling returned %v", err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(outcomes) != 4 || outcomes[0] != nil {
			t.Errorf("outcomes %v", outcomes)
		}
		// A server that answers ERROR 7 (a reference MTS) was reached too.
		m.SetReferenceControl(true)
		var got error
		ctx, cancel = context.WithCancel(t.Context())
		go d.KeepPolling(ctx, 0, func(err error) { got = err; cancel() })
		<-ctx.Done()
		var e *Error
		if !errors.As(got, &e) || e.Code != emsd.CodeProtocolViolation {
			t.Errorf("reference MTS poll: %v", got)
		}
	})
}
