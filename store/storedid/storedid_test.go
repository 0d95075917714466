package storedid

import (
	"errors"
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
)

func TestMessageIDRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		id   emsd.MessageID
		want string
	}{
		{emsd.LocalID(0x325d8221, 1), "L:325d8221.00000001"},
		{emsd.RFC822ID("<a@b>"), "R:<a@b>"},
		{emsd.RFC822ID(""), "R:"},
	} {
		got := MessageID(tc.id).String()
		if got != tc.want {
			t.Errorf("MessageID(%v).String() = %q, want %q", tc.id, got, tc.want)
		}
		back, err := ParseMessageID(got)
		if err != nil || back != tc.id {
			t.Errorf("ParseMessageID(%q) = %v, %v; want %v", got, back, err, tc.id)
		}
	}
}

func TestParseMessageIDMalformed(t *testing.T) {
	for _, s := range []string{"", "X", "L:zz", "L:198036", "<a@b>"} {
		if _, err := ParseMessageID(s); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseMessageID(%q) = %v, want ErrMalformed", s, err)
		}
		if got := Text(s); got != s {
			t.Errorf("Text(%q) = %q, want it unchanged", s, got)
		}
	}
	if got := Text("L:6b17127c.00000003"); got != "6b17127c.00000003" {
		t.Errorf("Text = %q", got)
	}
}

func TestAddress(t *testing.T) {
	for _, tc := range []struct {
		a    emsd.ORAddress
		want string
	}{
		{emsd.LocalOR(198036, ""), "L:198036"},
		{emsd.RFC822OR("bob@example.com"), "R:bob@example.com"},
	} {
		got := Address(tc.a).String()
		if got != tc.want {
			t.Errorf("Address(%v).String() = %q, want %q", tc.a, got, tc.want)
		}
		if back := ParseAddress(got); back != tc.a {
			t.Errorf("ParseAddress(%q) = %v, want %v", got, back, tc.a)
		}
	}
	if got := Internet("bob@example.com"); got != "R:bob@example.com" {
		t.Errorf("Internet = %q", got)
	}
	if got := InternetSpec("R:bob@example.com"); got != "bob@example.com" {
		t.Errorf("InternetSpec = %q", got)
	}
	// Not a device number: an rfc822 address, as reports name an
	// unparsable recipient.
	if got := ParseAddress("L:zz"); got != emsd.RFC822OR("L:zz") {
		t.Errorf("ParseAddress(L:zz) = %v", got)
	}
}

func TestShown(t *testing.T) {
	for _, c := range []struct{ stored, want string }{
		{"L:6b17127c.00000003", "6b17127c.00000003"},
		{"L:198037", "198.037"},
		{"R:<a@b>", "<a@b>"},
		{"R:bob@example.com", "bob@example.com"},
		{"L:x.y", "x.y"},
		{"plain", "plain"},
		{"", ""},
	} {
		if got := Shown(c.stored); got != c.want {
			t.Errorf("Shown(%q) = %q, want %q", c.stored, got, c.want)
		}
	}
}
