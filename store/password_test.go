package store

import (
	"errors"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestPasswords(t *testing.T) {
	h, err := HashPassword("secret")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(h, "$2") || strings.Contains(h, "secret") {
		t.Errorf("hash %q", h)
	}
	for _, tc := range []struct {
		hash, pw string
		want     bool
	}{
		{h, "secret", true},
		{h, "Secret", false},
		{h, "", false},
		{"", "", false}, // no password: nothing matches (callers skip the check)
		{"not a hash", "secret", false},
	} {
		if got := CheckPassword(tc.hash, tc.pw); got != tc.want {
			t.Errorf("CheckPassword(%q, %q) = %v", tc.hash, tc.pw, got)
		}
	}
	if h, err := HashPassword(""); err != nil || h != "" {
		t.Errorf("empty password: %q %v", h, err)
	}
	if _, err := HashPassword(strings.Repeat("x", MaxPassword+1)); !errors.Is(err, ErrPasswordTooLong) {
		t.Errorf("long password: %v", err)
	}
	if _, err := HashPassword(strings.Repeat("x", MaxPassword)); err != nil {
		t.Errorf("16 octets: %v", err)
	}
}
