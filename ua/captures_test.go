package ua

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/captures"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

// The tests in this file hold the client against the datagrams of the C
// reference (internal/captures, spec §7.3).

const hostless198036 = `"198.036": ` // how the reference shell renders "From: 198.036" (§6.2)

// reassembleCapture returns the instance ids and the reassembled arguments
// of the submission INVOKEs of a captured section.
func captureSubmission(t *testing.T, name string) (ids []uint8, args [][]byte, content []byte) {
	t.Helper()
	for _, dg := range captures.Get(name).Datagrams {
		p, err := esro.ParsePDU(dg.Payload)
		if err != nil || p.Type != esro.TypeInvoke {
			continue
		}
		ids = append(ids, p.Data[0])
		args = append(args, p.Data[1:])
		var a emsd.SubmitArgument
		must(t, a.Unmarshal(p.Data[1:], emsd.Options{}))
		content = append(content, a.Contents...)
	}
	return ids, args, content
}

// referenceDevice is a device configured like the reference UA: no
// password (so no security element), SEQUENCE OF reversed (§2.11).
var referenceDevice = Config{Address: 198036, ReferenceSecurity: true, ReverseSequenceOf: true}

// The captured submissions are reproduced octet for octet from the same
// inputs (the mail the reference shell read), apart from the instance id.
func TestCaptureSubmissions(t *testing.T) {
	for _, tc := range []struct {
		section string
		msg     Message
		from    string // originator as the reference shell passed it; "" = the device
	}{
		{"emsd-submit-1", Message{To: []string{"someone@example.com"}, Subject: "Hello over EMSD",
			Body: []byte("This is a test message submitted via EMSD (RFC 2524) over ESRO on loopback.\n")}, hostless198036},
		{"emsd-submit-2", Message{To: []string{"other@example.org"}, Subject: "second", Body: []byte("Second message.\n")}, hostless198036},
		// TV13: the X-Custom headers of the mail are dropped by the
		// reference UA; they are simply not passed here.
		{"emsd-submit-multi-recipient-local", Message{To: []string{"EMSD198.037", "someone@example.com"}, Cc: []string{"other@example.org"},
			Bcc: []string{"EMSD198.036"}, ReplyTo: []string{"EMSD198.037"}, InReplyTo: "<prev@example.com>",
			Subject: "Multi submit", Body: []byte("Body text.\n")}, ""},
	} {
		t.Run(tc.section, func(t *testing.T) {
			m, d := udpPair(t, referenceDevice)
			ipm, err := tc.msg.IPM(198036)
			must(t, err)
			if tc.from != "" {
				ipm.Heading.Originator = emsd.RFC822OR(tc.from)
			}
			if _, err := d.SubmitIPM(t.Context(), ipm); err != nil {
				t.Fatal(err)
			}
			_, wantArgs, wantIPM := captureSubmission(t, tc.section)
			got := m.Invocations()
			if len(got) != 1 || len(wantArgs) != 1 {
				t.Fatalf("%d invocations, capture has %d", len(got), len(wantArgs))
			}
			gotIPM, err := ipm.Marshal(emsd.Options{ReverseSequenceOf: true})
			must(t, err)
			if !bytes.Equal(gotIPM, wantIPM) {
				t.Fatalf("IPM\n got % x\nwant % x", gotIPM, wantIPM)
			}
			if !bytes.Equal(got[0].Arg, wantArgs[0]) {
				t.Fatalf("SubmitArgument\n got % x\nwant % x", got[0].Arg, wantArgs[0])
			}
		})
	}
}

// EMSD=<n> is a local address here (Open Point 23, §6.1 Recommend): the
// mail the reference shell turned into rfc822 strings
// [emsd-submit-emsd-equals-not-local] gives the TV13 octets instead.
func TestCaptureEMSDEquals(t *testing.T) {
	m, d := udpPair(t, referenceDevice)
	_, err := d.Submit(t.Context(), &Message{From: "EMSD=198.036", To: []string{"EMSD=198.037", "someone@example.com"},
		Cc: []string{"other@example.org"}, Bcc: []string{"EMSD=198.036"}, ReplyTo: []string{"EMSD=198.037"},
		InReplyTo: "<prev@example.com>", Subject: "Multi submit", Body: []byte("Body text.\n")})
	must(t, err)
	_, want, _ := captureSubmission(t, "emsd-submit-multi-recipient-local")
	if got := m.Invocations(); !bytes.Equal(got[0].Arg, want[0]) {
		t.Fatalf("got % x\nwant % x", got[0].Arg, want[0])
	}
}

// TV7: the 4000-octet body gives the same IPM; the segments are sized to
// the PDU (§8 Recommend) instead of 1400-octet chunks, so their count,
// sequence id and instance ids match, their sizes do not.
func TestCaptureSegmentedSubmission(t *testing.T) {
	m, d := udpPair(t, referenceDevice)
	var body strings.Builder
	for i := 1; body.Len() < 4000; i++ {
		body.WriteString("Line " + string([]byte{byte('0' + i/100), byte('0' + i/10%10), byte('0' + i%10)}) + " of a long EMSD test body, to force segmentation.\n")
	}
	ipm, err := (&Message{To: []string{"someone@example.com"}, Subject: "Big submission", Body: []byte(body.String()[:3999] + "\n")}).IPM(198036)
	must(t, err)
	ipm.Heading.Originator = emsd.RFC822OR(hostless198036)
	if _, err := d.SubmitIPM(t.Context(), ipm); err != nil {
		t.Fatal(err)
	}
	wantIDs, wantArgs, wantIPM := captureSubmission(t, "emsd-submit-segmented")
	subs := m.Submissions()
	if len(subs) != 1 || !bytes.Equal(subs[0].Arg.Contents, wantIPM) {
		t.Fatal("reassembled IPM differs from the capture's")
	}
	got := m.Invocations()
	if len(got) != len(wantArgs) {
		t.Fatalf("%d segments, capture has %d", len(got), len(wantArgs))
	}
	for i, g := range got {
		var a, w emsd.SubmitArgument
		must(t, a.Unmarshal(g.Arg, emsd.Options{}))
		must(t, w.Unmarshal(wantArgs[i], emsd.Options{}))
		if g.Instance != wantIDs[i] || *a.Segment != *w.Segment || a.Security != nil || a.ContentType != w.ContentType {
			t.Fatalf("segment %d: instance %d segment %+v, capture %d %+v", i, g.Instance, a.Segment, wantIDs[i], w.Segment)
		}
	}
}

// replay plays the MTS side of a captured section against a device
// listening at the section's UA address and checks that every datagram
// the device sends equals the reference UA's, in order.
func replay(t *testing.T, mts *lossynet.Conn, section string) {
	t.Helper()
	mtsAddr := mts.AddrPort().String()
	for i, dg := range captures.Get(section).Datagrams {
		if dg.From == mtsAddr {
			to := netip.MustParseAddrPort(dg.To)
			if _, err := mts.WriteToUDPAddrPort(dg.Payload, to); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want := dg.Payload
		buf := make([]byte, 2048)
		mts.SetReadDeadline(time.Now().Add(5 * time.Second))
		k, from, err := mts.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("%s #%d: no answer (%v), reference sent % x", section, i, err, dg.Payload)
		}
		if from.String() != dg.From || !bytes.Equal(buf[:k], want) {
			t.Fatalf("%s #%d: %s sent % x, want % x from %s", section, i, from, buf[:k], want, dg.From)
		}
	}
	// Nothing else follows (no retransmission, no stray answer).
	synctest.Wait()
	mts.SetReadDeadline(time.Now().Add(30 * time.Second))
	if k, _, err := mts.ReadFromUDPAddrPort(make([]byte, 2048)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: unexpected datagram after the section (%d octets, %v)", section, k, err)
	}
}

// captureDevice starts, on a fresh lossless network, the MTS socket of the
// captures (127.0.0.10:2002) and a device at ua.
func captureDevice(t *testing.T, ua string, cfg Config) (*lossynet.Conn, *device) {
	n := lossynet.New(lossynet.Config{})
	mts, err := n.Listen("127.0.0.10:2002")
	must(t, err)
	t.Cleanup(func() { mts.Close() })
	dc, err := n.Listen(ua)
	must(t, err)
	cfg.Server = mts.AddrPort()
	if cfg.Address == 0 {
		cfg.Address = 198036
	}
	return mts, newDevice(t, dc, esro.ShippedTimers(), cfg)
}

// Captured deliveries of the reference MTS, and the hand-made probes, fed
// to the client: its answers are the reference UA's (RESULT without data,
// or ERROR 7 with ErrorParameter 7), and the deliveries reach the handler.
func TestCaptureDeliveries(t *testing.T) {
	const ua1, ua2 = "127.0.0.11:2002", "127.0.0.12:2002"
	for _, tc := range []struct {
		section string
		ua      string
		check   func(t *testing.T, got []*Delivery)
	}{
		{"emsd-deliver-3way", ua1, func(t *testing.T, got []*Delivery) {
			want := &Delivery{MessageID: emsd.RFC822ID("<in3way.20261126@example.com>"), DeliveryTime: time.Unix(1795678741, 0).UTC(),
				SubmissionTime: time.Unix(1795676400, 0).UTC()}
			g := one(t, got)
			if g.MessageID != want.MessageID || !g.DeliveryTime.Equal(want.DeliveryTime) || !g.SubmissionTime.Equal(want.SubmissionTime) ||
				g.IPM.Heading.Originator != emsd.RFC822OR("Alice Example <alice@example.com>") ||
				g.IPM.Heading.Subject != "Inbound test, Complete mode" || string(g.IPM.Body.Text) != "Hello device, this is inbound mail number one.\n" ||
				g.From.String() != "127.0.0.10:2002" {
				t.Fatalf("delivery %+v", g)
			}
		}},
		{"emsd-deliver-2way", ua2, func(t *testing.T, got []*Delivery) {
			if g := one(t, got); g.IPM.Heading.Subject != "Inbound test, Efficient mode" {
				t.Fatalf("delivery %+v", g)
			}
		}},
		{"emsd-deliver-segmented-3way", ua1, checkLong},
		// The reference answers segments 2 and 3 after a 4 s pause (§8);
		// this client answers at once: only the timing differs.
		{"emsd-deliver-segmented-2way", ua2, checkLong},
		{"emsd-deliver-report-rejected-by-ua", ua1, none},
		{"emsd-deliver-report-lf-becomes-ipm", ua1, func(t *testing.T, got []*Delivery) {
			if g := one(t, got); len(g.IPM.Heading.Extensions) != 3 || g.IPM.Heading.Extensions[2].Label != "X-EMSD-Message-Type" {
				t.Fatalf("extensions %+v", g.IPM.Heading.Extensions)
			}
		}},
		{"emsd-deliver-multi-recipient", ua1, func(t *testing.T, got []*Delivery) {
			h := one(t, got).IPM.Heading
			if h.Sender == nil || len(h.Recipients) != 3 || len(h.ReplyTo) != 2 || h.RepliedTo == nil || h.MIMEVersion != "1.0" ||
				h.Recipients[0].Flags != emsd.RcptCopy|emsd.RcptNonDeliveryReport {
				t.Fatalf("heading %+v", h)
			}
		}},
		{"probe-ua-op4-subctl-sap3", ua1, none},
		{"probe-ua-op36-sap3", ua1, none},
		{"probe-ua-deliver-garbage", ua1, none},
		{"probe-ua-deliver-other-seg-unknown-seq", ua1, none},
		{"probe-ua-deliver-encoding-1", ua1, none},
		{"probe-ua-deliver-content-type-33", ua1, none},
		{"probe-ua-deliver-unbound-sap5", ua1, none}, // ESRO FAILURE 2: SAP 5 is not the UA's
		{"probe-ua-deliver-local-id-local-orig", ua1, func(t *testing.T, got []*Delivery) {
			g := one(t, got)
			if !g.MessageID.IsLocal || g.MessageID.String() != "6b07d9d0.00000007" || g.IPM.Heading.Originator != emsd.LocalOR(198037, "") ||
				!g.SubmissionTime.Equal(time.Unix(0x6b07dfc4, 0)) {
				t.Fatalf("delivery %+v", g)
			}
		}},
		{"probe-ua-deliver-single-first-segment", ua1, probe},
		{"probe-ua-deliver-with-password", ua1, func(t *testing.T, got []*Delivery) {
			if s := one(t, got).Security; s == nil || s.Password != "secret" {
				t.Fatalf("security %+v", s)
			}
		}},
		{"probe-ua-deliver-2way-sap7", ua1, probe},
	} {
		t.Run(tc.section, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				// Reference MTS peers send instance id 0 on every INVOKE:
				// their sections need the window off (Open Point 2).
				mts, d := captureDevice(t, tc.ua, Config{NoDuplicateWindow: strings.HasPrefix(tc.section, "emsd-")})
				replay(t, mts, tc.section)
				tc.check(t, d.rec.deliveries())
			})
		})
	}
}

// probe-ua-deliver-dup-instance-again repeats instance id 05 after
// probe-ua-deliver-local-id-local-orig. The answer is the same RESULT in
// both modes; with the window (the spec's recommendation, §1.5) the
// message is not delivered again, without it (the reference) it is.
func TestCaptureDuplicateInstance(t *testing.T) {
	for _, off := range []bool{false, true} {
		synctest.Test(t, func(t *testing.T) {
			mts, d := captureDevice(t, "127.0.0.11:2002", Config{NoDuplicateWindow: off})
			replay(t, mts, "probe-ua-deliver-local-id-local-orig")
			replay(t, mts, "probe-ua-deliver-dup-instance-again")
			want := 1
			if off {
				want = 2
			}
			if got := len(d.rec.deliveries()); got != want {
				t.Fatalf("window off=%v: %d deliveries, want %d", off, got, want)
			}
		})
	}
}

// TV14: the reference UA never answered the MTS's submission verify; this
// client answers "send" (1) for the id it just got back (§10.4).
func TestCaptureSubmissionVerify(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mts, d := captureDevice(t, "127.0.0.11:2002", Config{})
		must(t, d.verify.Add(emsd.LocalMessageID{SubmissionTime: 0x6b07e3fe, Number: 1}))
		var inv []byte
		for _, dg := range captures.Get("emsd-submit-lost-ack-submission-verify").Datagrams {
			if dg.Payload[0] == 0x70 {
				inv = dg.Payload
				break
			}
		}
		for range 2 { // the INVOKE and a retransmission of it
			mts.WriteToUDPAddrPort(inv, d.addr)
			buf := make([]byte, 64)
			mts.SetReadDeadline(time.Now().Add(5 * time.Second))
			k, _, err := mts.ReadFromUDPAddrPort(buf)
			if want := []byte{0x01, inv[1], 0x30, 0x03, 0x0a, 0x01, 0x01}; err != nil || !bytes.Equal(buf[:k], want) {
				t.Fatalf("answer % x (%v), want % x", buf[:k], err, want)
			}
		}
	})
}

func one(t *testing.T, got []*Delivery) *Delivery {
	t.Helper()
	if len(got) != 1 {
		t.Fatalf("%d deliveries, want 1", len(got))
	}
	return got[0]
}

func none(t *testing.T, got []*Delivery) {
	t.Helper()
	if len(got) != 0 {
		t.Fatalf("%d deliveries, want none", len(got))
	}
}

func probe(t *testing.T, got []*Delivery) {
	t.Helper()
	if g := one(t, got); g.MessageID != emsd.RFC822ID("<probe@example.com>") || g.IPM.Heading.Subject != "Probe" {
		t.Fatalf("delivery %+v", g)
	}
}

func checkLong(t *testing.T, got []*Delivery) {
	t.Helper()
	g := one(t, got)
	if !strings.HasPrefix(g.MessageID.RFC822, "<inbig") || len(g.IPM.Body.Text) != 4000 ||
		!bytes.HasPrefix(g.IPM.Body.Text, []byte("Line 001 of a long EMSD test body")) {
		t.Fatalf("delivery %v, %d octets", g.MessageID, len(g.IPM.Body.Text))
	}
}
