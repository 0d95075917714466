package emsd

import (
	"testing"
	"time"
)

func TestAddressText(t *testing.T) {
	for a, want := range map[Address]string{
		166058: "166.058", 1234: "001.234", 301001: "301.001", 1234567: "1234.567",
		0: "000.000", 7: "000.007", 4294967295: "4294967.295", 198036: "198.036",
	} {
		if got := a.String(); got != want {
			t.Errorf("%d: %q, want %q", a, got, want)
		}
		if back, err := ParseAddress(want); err != nil || back != a {
			t.Errorf("ParseAddress(%q) = %d, %v", want, back, err)
		}
	}
	for s, want := range map[string]Address{
		"1234": 1234, "198.36": 198036, " 198.036 ": 198036, "1.2.3": 1002003,
		"301.001.999": 301001999, "4294.967.295": 4294967295, "0": 0, "4294967295": 4294967295,
	} {
		if got, err := ParseAddress(s); err != nil || got != want {
			t.Errorf("ParseAddress(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
	for _, s := range []string{"", ".", "a", "1.", ".1", "1..2", "1.1000", "1.2.3.4", "4294967296",
		"4294967.296", "4294.967.296", "-1", "+1", "1 2", "１"} {
		if a, err := ParseAddress(s); err == nil {
			t.Errorf("ParseAddress(%q) = %d, want error", s, a)
		}
	}
}

func TestParseDeviceAddress(t *testing.T) {
	for s, want := range map[string]Address{
		"EMSD301.001": 301001, "EMSD1234": 1234, "EMSD=1234": 1234, "EMSD=198.036": 198036,
		`"EMSD=198.036"`: 198036, `"EMSD198.036"`: 198036, `"EMSD=198.036": `: 198036,
		`"EMSD=198.036": ;`: 198036, "emsd=5": 5, " EMSD2345 ": 2345, "EMSD=99199": 99199,
	} {
		if got, err := ParseDeviceAddress(s); err != nil || got != want {
			t.Errorf("ParseDeviceAddress(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
	for _, s := range []string{"", "EMSD", "EMSD=", "EMSDx1", "EMSD=.1", "198.036", "XEMSD1", `"EMSD1`,
		"EMSD==1", "EMSD1@host", "someone@example.com", `"198.036": `} {
		if a, err := ParseDeviceAddress(s); err == nil {
			t.Errorf("ParseDeviceAddress(%q) = %d, want error", s, a)
		}
	}
}

func TestMessageIDs(t *testing.T) {
	id := LocalMessageID{0x325d8221, 1}
	if id.String() != "325d8221.00000001" {
		t.Fatal(id.String())
	}
	for s, want := range map[string]LocalMessageID{
		"325d8221.00000001": id, "325D8221.1": id, "0.0": {}, "ffffffff.ffffffff": {0xffffffff, 0xffffffff},
	} {
		if got, err := ParseLocalMessageID(s); err != nil || got != want {
			t.Errorf("ParseLocalMessageID(%q) = %v, %v", s, got, err)
		}
	}
	for _, s := range []string{"", ".", "1.", "325d8221", "1.2.3", "123456789.1", "g.1", "+1.1", "-1.1"} {
		if _, err := ParseLocalMessageID(s); err == nil {
			t.Errorf("ParseLocalMessageID(%q) accepted", s)
		}
	}
	if m := LocalID(0x6b07e3fe, 1); m.String() != "6b07e3fe.00000001" || !m.IsLocal {
		t.Fatal(m)
	}
	if m := RFC822ID("<a@b>"); m.String() != "<a@b>" || m.IsLocal {
		t.Fatal(m)
	}
	// MessageID is comparable and can key a verify table (§9.13 Recommend).
	tab := map[MessageID]DeliveryStatus{LocalID(1, 2): DeliveryReportSent, RFC822ID("<x>"): NonDeliveryReportSent}
	if tab[LocalID(1, 2)] != DeliveryReportSent || tab[RFC822ID("<x>")] != NonDeliveryReportSent || tab[LocalID(1, 3)] != 0 {
		t.Fatal("map keys")
	}
	if s := LocalOR(166058, "").String(); s != "166.058" {
		t.Fatal(s)
	}
	if s := LocalOR(1234, "Bob").String(); s != "Bob <001.234>" {
		t.Fatal(s)
	}
	if s := RFC822OR("a@b").String(); s != "a@b" {
		t.Fatal(s)
	}
}

func TestTime(t *testing.T) {
	tm := Time(0x325d8221)
	if got := tm.UTC(); !got.Equal(time.Date(1996, 10, 10, 23, 9, 21, 0, time.UTC)) || tm.String() != "1996-10-10T23:09:21Z" {
		t.Fatal(got)
	}
	if Time(0xffffffff).UTC().Year() != 2106 {
		t.Fatal("32-bit unsigned times")
	}
	if TimeOf(time.Unix(-5, 0)) != 0 || TimeOf(time.Unix(1<<33, 0)) != 0xffffffff || TimeOf(tm.UTC()) != tm {
		t.Fatal("TimeOf")
	}
}

func TestOperations(t *testing.T) {
	cases := []struct {
		op  Operation
		v   Version
		w   Operation
		ok  bool
		str string
	}{
		{OpSubmission, V1_1, 33, true, "submission"},
		{OpDelivery, V1_1, 35, true, "delivery"},
		{OpDeliveryControl, V1_1, 2, true, "delivery-control"},
		{OpSubmissionControl, V1_1, 4, true, "submission-control"},
		{OpDeliveryVerify, V1_1, 5, true, "delivery-verify"},
		{OpSubmissionVerify, V1_1, 6, true, "submission-verify"},
		{OpGetConfiguration, V1_1, 7, true, "get-configuration"},
		{OpSetConfiguration, V1_1, 8, true, "set-configuration"},
		{OpSubmission, V1_0, OpSubmissionV1_0, true, ""},
		{OpDelivery, V1_0, OpDeliveryV1_0, true, ""},
		{OpDeliveryControl, V1_0, OpDeliveryControlV1_0, true, ""},
		{OpSubmissionControl, V1_0, OpSubmissionControlV1_0, true, ""},
		{OpGetConfiguration, V1_0, OpGetConfigurationV1_0, true, ""},
		{OpSetConfiguration, V1_0, OpSetConfigurationV1_0, true, ""},
		{OpDeliveryVerify, V1_0, 0, false, ""},
		{OpSubmissionVerify, V1_0, 0, false, ""},
		{36, V1_1, 0, false, "op(36)"},
	}
	for _, c := range cases {
		w, ok := c.op.Wire(c.v)
		if w != c.w || ok != c.ok {
			t.Errorf("%d.Wire(%v) = %d %v", c.op, c.v, w, ok)
		}
		if ok {
			if back, ok := ParseOperation(w, c.v); !ok || back != c.op {
				t.Errorf("ParseOperation(%d, %v) = %d %v", w, c.v, back, ok)
			}
		}
		if c.str != "" && c.op.String() != c.str {
			t.Errorf("%d: %s", c.op, c.op)
		}
	}
	if _, ok := ParseOperation(33, V1_0); ok {
		t.Error("33 is not a 1.0 operation")
	}
	if _, ok := ParseOperation(1, V1_1); ok {
		t.Error("1 is not a 1.1 operation")
	}
	if SAPUAInvoker3Way+1 != SAPMTSPerformer3Way || SAPMTSInvoker3Way+1 != SAPUAPerformer3Way ||
		SAPMTSInvoker2Way+1 != SAPUAPerformer2Way || SAPUAInvoker2Way+1 != SAPMTSPerformer2Way {
		t.Error("invoker = performer - 1")
	}
}

func TestStrings(t *testing.T) {
	for got, want := range map[string]string{
		(RcptCopy | RcptNonDeliveryReport).String():      "copy-recipient|non-delivery-report",
		PerRecipientFlags(0).String():                    "none",
		(MsgPriorityUrgent | MsgImportanceHigh).String(): "priority-urgent|importance-high",
		PerMessageFlags(0x80).String():                   "bit7",
		ContentIPM.String():                              "ipm95",
		ContentType(99).String():                         "content-type(99)",
		DiagContentTooLong.String():                      "content-too-long",
		Diagnostic(15).String():                          "diagnostic(15)",
		ReasonRestrictedDelivery.String():                "restricted-delivery",
		Version(5).String():                              "Version(5)",
	} {
		if got != want {
			t.Errorf("%q, want %q", got, want)
		}
	}
	if !(RcptCopy | RcptBlindCopy).Has(RcptCopy) || RcptCopy.Has(RcptCopy|RcptBlindCopy) ||
		!(WaitingLongContent | WaitingLowPriority).Has(WaitingLowPriority) || !MsgAutoForwarded.Has(MsgAutoForwarded) {
		t.Error("Has")
	}
	if OperationSet(1<<63).Has(64) || !Operations(63).Has(63) {
		t.Error("OperationSet bounds")
	}
}
