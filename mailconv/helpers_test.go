package mailconv

import (
	"bytes"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
)

// mustEncode checks the promise of ParseMessage: the content encodes in
// 1.1 and 1.0 within the budget and survives a decode/encode cycle.
func mustEncode(t testing.TB, in *Parsed, budget int) {
	t.Helper()
	if budget == 0 {
		budget = DefaultMaxContent
	}
	var c emsd.Content = in.IPM
	if in.ContentType == emsd.ContentDeliveryReport {
		c = in.Report
	}
	if (in.IPM == nil) == (in.Report == nil) {
		t.Fatalf("exactly one of IPM and Report must be set: %+v", in)
	}
	for _, v := range []emsd.Version{emsd.V1_1, emsd.V1_0} {
		o := emsd.Options{Version: v}
		b, err := c.Marshal(o)
		if err != nil {
			t.Fatalf("%v encode: %v", v, err)
		}
		if len(b) > budget {
			t.Fatalf("%v: %d octets, budget %d", v, len(b), budget)
		}
		back, err := emsd.DecodeContents(in.ContentType, b, o)
		if err != nil {
			t.Fatalf("%v decode: %v", v, err)
		}
		b2, err := back.Marshal(o)
		if err != nil || !bytes.Equal(b, b2) {
			t.Fatalf("%v: re-encoding differs (%v)", v, err)
		}
	}
	if len(in.MessageID) > emsd.MaxMessageID || in.MessageID == "" {
		t.Fatalf("message id %q", in.MessageID)
	}
	if _, err := (&emsd.DeliverArgument{MessageID: emsd.RFC822ID(in.MessageID), ContentType: in.ContentType}).Marshal(emsd.Options{}); err != nil {
		t.Fatalf("message id does not encode: %v", err)
	}
}

// normalizeIPM sorts every SEQUENCE OF (the reference reverses them,
// §2.11) and maps empty slices to nil, for comparisons.
func normalizeIPM(m *emsd.IPM) *emsd.IPM {
	c := *m
	h := &c.Heading
	h.Recipients = append([]emsd.RecipientData(nil), h.Recipients...)
	sort.Slice(h.Recipients, func(i, j int) bool { return h.Recipients[i].Recipient.String() < h.Recipients[j].Recipient.String() })
	h.ReplyTo = append([]emsd.ORAddress(nil), h.ReplyTo...)
	sort.Slice(h.ReplyTo, func(i, j int) bool { return h.ReplyTo[i].String() < h.ReplyTo[j].String() })
	h.Extensions = append([]emsd.Extension(nil), h.Extensions...)
	sort.Slice(h.Extensions, func(i, j int) bool { return h.Extensions[i].Label < h.Extensions[j].Label })
	if len(h.Recipients) == 0 {
		h.Recipients = nil
	}
	if len(h.ReplyTo) == 0 {
		h.ReplyTo = nil
	}
	if len(h.Extensions) == 0 {
		h.Extensions = nil
	}
	if c.Body == nil {
		c.Body = &emsd.Body{}
	}
	if len(c.Body.Text) == 0 {
		c.Body = &emsd.Body{}
	}
	return &c
}

func diffIPM(t testing.TB, got, want *emsd.IPM) {
	t.Helper()
	g, w := normalizeIPM(got), normalizeIPM(want)
	if !reflect.DeepEqual(g.Heading, w.Heading) {
		t.Errorf("heading\n got %+v\nwant %+v", g.Heading, w.Heading)
	}
	if !bytes.Equal(g.Body.Text, w.Body.Text) {
		t.Errorf("body\n got %q\nwant %q", g.Body.Text, w.Body.Text)
	}
}

// crlfText turns a readable LF test mail into CRLF.
func crlfText(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }
