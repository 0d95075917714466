package captures

import "testing"

func TestParseAll(t *testing.T) {
	secs := All()
	if len(secs) < 40 {
		t.Fatalf("got %d sections, want the file's 40+", len(secs))
	}
	s := Get("esro-3way-result")
	if len(s.Datagrams) != 3 || s.Datagrams[2].From != "2003" || s.Datagrams[2].To != "2002" {
		t.Fatalf("esro-3way-result = %+v", s.Datagrams)
	}
	if got := s.Datagrams[2].Payload; len(got) != 2 || got[0] != 0x03 || got[1] != 0x5e {
		t.Fatalf("ACK payload = % x", got)
	}
	for _, s := range secs {
		if len(s.Datagrams) == 0 {
			t.Errorf("section %s has no datagrams", s.Name)
		}
	}
}

func TestParseRejectsMalformed(t *testing.T) {
	for _, in := range []string{"+0.0 a->b 00", "## x\n+0.0 ab 00", "## x\n+z a->b 00", "## x\n+0 a->b 0g"} {
		if _, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) succeeded", in)
		}
	}
}
