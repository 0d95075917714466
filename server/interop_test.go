package server

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
)

// Regressions found running the server against the C reference UA (the
// reference's datagrams come from the captures).

// A reference UA restarts its instance ids (and segmentation sequence ids)
// at 0 with every start (docs/protocol.md EMSD §1.5, §8), as does each run of
// emsdp ua send, and its ids wrap after 256 INVOKEs. The same message sent
// again after its first copy was acknowledged is therefore a new message,
// not a re-invocation: it gets its own id and is sent again. (The server
// once answered the old id and dropped it for an hour after the first.)
func TestResubmissionAfterRestart(t *testing.T) {
	for _, tc := range []struct{ name, from string }{
		{"emsd-submit-1", "2003"},
		{"emsd-submit-segmented", "127.0.0.11:2002"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, testConfig(t))
			dev := newDevice(t, s, 198036, deviceOpts{ip: "127.0.0.11"})
			invokes := captureInvokes(t, tc.name, tc.from)
			var ids []emsd.LocalMessageID
			for run := range 2 { // the same datagrams, as from a restarted UA
				var res *esro.Result
				for _, p := range invokes {
					var err error
					res, err = dev.ep.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: p.SAP,
						Operation: p.Operation, Encoding: p.Encoding, Handshake: esro.ThreeWay, Data: p.Data})
					must(t, err)
				}
				var sr emsd.SubmitResult
				must(t, sr.Unmarshal(res.Data, emsd.Options{}))
				ids = append(ids, sr.MessageID)
				eventually(t, "submission released", func() bool {
					st := queueStats(t, s)
					return st.SubmissionsPending == 0 && st.Relays[store.RelayQueued] == run+1
				})
			}
			if ids[0] == ids[1] {
				t.Errorf("both submissions got id %s: the second was merged into the first", ids[0])
			}
		})
	}
}

// A real re-invocation (the device did not get the RESULT, so it invokes
// the same segment again with the same instance id) still gets the first
// copy's id and does not send the message twice.
func TestReinvokedSubmissionDeduplicated(t *testing.T) {
	s := startServer(t, testConfig(t))
	d := newRawDevice(t, s, 198036)
	arg := emsd.PrependInstanceID(0, submitArg(t, nil, emsd.ContentIPM, testIPM("bob@example.com"), emsd.Options{}))
	d.send(t, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: 9, Operation: 33, Data: arg})
	first := d.recv(t, func(p esro.PDU) bool { return p.Type == esro.TypeResult && p.Ref == 9 })
	// The RESULT is "lost": no ACK; the device invokes again.
	d.send(t, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: 10, Operation: 33, Data: arg})
	second := d.recv(t, func(p esro.PDU) bool { return p.Type == esro.TypeResult && p.Ref == 10 })
	d.send(t, &esro.PDU{Type: esro.TypeAck, Ref: 10})
	if !bytes.Equal(first.Data, second.Data) {
		t.Errorf("re-invocation answered %x, first answer %x", second.Data, first.Data)
	}
	eventually(t, "submission released", func() bool {
		st := queueStats(t, s)
		return st.SubmissionsPending == 0 && st.Relays[store.RelayQueued] == 1
	})
	if got := queueStats(t, s).Relays[store.RelayQueued]; got != 1 {
		t.Errorf("%d relays, want 1", got)
	}
}

// refShellDevice plays the reference UA with its Unix shell (docs/protocol.md EMSD
// §10.3): it accepts only IPMs (content type 2 gets ERROR 7 with parameter
// 7, TV11) and stores a message for its user only when the IPM names the
// device among its local recipients; otherwise it stores it anyway but
// answers ERROR 7 with parameter 7. Accepted IPMs go to got.
func refShellDevice(t *testing.T, s *Server, addr emsd.Address, ip string, mode store.Mode) (*esro.Endpoint, chan *emsd.IPM) {
	t.Helper()
	ep := listenESRO(t, ip)
	addDevice(t, s, addr, epAddr(ep), deviceOpts{mode: mode})
	got := make(chan *emsd.IPM, 10)
	refuse := func(w esro.ResponseWriter) { w.Error(esro.EncodingBER, 7, []byte{2, 1, 7}) }
	h := func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		_, arg, err := emsd.StripInstanceID(emsd.Operation(inv.Operation), inv.Data)
		var da emsd.DeliverArgument
		if err != nil || inv.Operation != 35 || da.Unmarshal(arg, emsd.Options{}) != nil || da.ContentType != emsd.ContentIPM {
			refuse(w)
			return
		}
		var ipm emsd.IPM
		if ipm.Unmarshal(da.Contents, emsd.Options{}) != nil {
			refuse(w)
			return
		}
		for _, r := range ipm.Heading.Recipients {
			if r.Recipient.IsLocal && r.Recipient.Local == addr {
				got <- &ipm
				w.Result(esro.EncodingBER, nil)
				return
			}
		}
		refuse(w) // "No EMSD user (address) matched the local user!"
	}
	must(t, ep.HandleFunc(3, esro.ThreeWay, h))
	must(t, ep.HandleFunc(7, esro.TwoWay, h))
	return ep, got
}

func waitIPM(t *testing.T, got chan *emsd.IPM, what string) *emsd.IPM {
	t.Helper()
	select {
	case ipm := <-got:
		return ipm
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not delivered", what)
		return nil
	}
}

// A submission naming devices in rfc822 form (the tester scripts' EMSD=<n>
// as the reference UA sends it, T0104's number@domain) reaches each device
// with the addresses in local form, so that a reference UA accepts it; the
// sender gets no (false) non-delivery notice.
func TestDeviceAddressesLocalInDeliveries(t *testing.T) {
	s := startServer(t, testConfig(t))
	a, gotA := refShellDevice(t, s, 198036, "127.0.0.11", store.ModeComplete)
	_, gotB := refShellDevice(t, s, 198037, "127.0.0.12", store.ModeEfficient)
	submit := func(arg []byte) {
		t.Helper()
		_, err := a.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: 5, Operation: 33,
			Handshake: esro.ThreeWay, Data: emsd.PrependInstanceID(0, arg)})
		must(t, err)
	}
	// 1. The reference UA's submission with EMSD=<n> addresses, as
	// captured: From EMSD=198.036, To EMSD=198.037 and someone@, Cc
	// other@, Bcc EMSD=198.036, Reply-To EMSD=198.037.
	p := captureInvokes(t, "emsd-submit-emsd-equals-not-local", "127.0.0.11:2002")[0]
	submit(p.Data[1:])
	for _, got := range []chan *emsd.IPM{gotB, gotA} {
		h := waitIPM(t, got, "EMSD=<n> submission").Heading
		for _, r := range h.Recipients {
			if !r.Recipient.IsLocal && r.Recipient.RFC822 != "someone@example.com" && r.Recipient.RFC822 != "other@example.org" {
				t.Errorf("recipient %v left in rfc822 form", r.Recipient)
			}
		}
		if h.Originator != emsd.LocalOR(198036, "") || len(h.ReplyTo) != 1 || h.ReplyTo[0] != emsd.LocalOR(198037, "") {
			t.Errorf("originator %v reply-to %v, want local 198.036 and 198.037", h.Originator, h.ReplyTo)
		}
	}
	// 2. T0104: number@domain.
	for _, to := range []string{"198.037@emsd.test", "Bob <198.037@EMSD.TEST>"} {
		submit(submitArg(t, nil, emsd.ContentIPM, testIPM(to), emsd.Options{}))
		waitIPM(t, gotB, to)
	}
	eventually(t, "deliveries recorded", func() bool {
		return queueStats(t, s).Deliveries[store.DeliveryDelivered] == 4
	})
	if n := queueStats(t, s).Deliveries[store.DeliveryFailed]; n != 0 {
		t.Errorf("%d deliveries failed (refused by the device)", n)
	}
	select {
	case ipm := <-gotA:
		t.Errorf("unexpected delivery to the sender: %q", ipm.Heading.Subject)
	case <-time.After(200 * time.Millisecond):
	}
}
