package ports

import (
	"strings"
	"testing"
)

func TestRegistered(t *testing.T) {
	tests := []struct {
		port        int
		proto       string
		wantFirst   string // the IANA name comes first
		wantAlso    []string
		wantMissing []string
	}{
		{641, "udp", "repcmd", []string{"esro-emsdp", "print server", "netinfo"}, nil},
		{641, "tcp", "repcmd", []string{"print server", "netinfo"}, []string{"esro-emsdp"}},
		{642, "udp", "esro-emsdp", []string{"netinfo"}, nil},
		{259, "udp", "esro-gen", []string{"firewall1-rdp"}, []string{"netinfo"}},
		{259, "tcp", "esro-gen", nil, []string{"firewall1-rdp"}},
		{2002, "udp", "globe", []string{"esros", "roughtime"}, nil},
		{2002, "tcp", "globe", nil, []string{"esros"}},
	}
	for _, tt := range tests {
		regs := lookupRegistrations(tt.port, tt.proto, nil)
		if len(regs) == 0 || regs[0].Name != tt.wantFirst || regs[0].Source != SourceIANA {
			t.Errorf("%d/%s: first registration %+v, want %s from IANA", tt.port, tt.proto, regs, tt.wantFirst)
			continue
		}
		names := map[string]bool{}
		for _, r := range regs {
			names[r.Name] = true
			if r.Port != tt.port || r.Proto != tt.proto {
				t.Errorf("%d/%s: foreign entry %+v", tt.port, tt.proto, r)
			}
		}
		for _, n := range tt.wantAlso {
			if !names[n] {
				t.Errorf("%d/%s: missing %s in %+v", tt.port, tt.proto, n, regs)
			}
		}
		for _, n := range tt.wantMissing {
			if names[n] {
				t.Errorf("%d/%s: unexpected %s", tt.port, tt.proto, n)
			}
		}
	}
	if r := Registered(12345); len(r) != 0 {
		t.Errorf("Registered(12345) = %+v", r)
	}
}

const servicesSample = `# comment line
repcmd		641/tcp			# repcmd
repcmd		641/udp
esro-emsdp	642/udp		emsdp	# ESRO-EMSDP V1.3
local-thing	641/udp		# a local name
bad		abc/udp
bad2		70000/tcp
bad3		5/ddp
onlyname
`

func TestParseServices(t *testing.T) {
	got, err := parseServices(strings.NewReader(servicesSample))
	if err != nil {
		t.Fatal(err)
	}
	want := []Registration{
		{641, "tcp", "repcmd", "repcmd", SourceServices},
		{641, "udp", "repcmd", "", SourceServices},
		{642, "udp", "esro-emsdp", "ESRO-EMSDP V1.3", SourceServices},
		{641, "udp", "local-thing", "a local name", SourceServices},
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	// The local name is added, the duplicate repcmd is not.
	regs := lookupRegistrations(641, "udp", got)
	n := 0
	for _, r := range regs {
		if r.Name == "repcmd" {
			n++
		}
	}
	if n != 1 || regs[len(regs)-1].Name != "local-thing" {
		t.Errorf("lookupRegistrations = %+v", regs)
	}
}

func TestReadServicesMissingFile(t *testing.T) {
	regs, err := readServices(t.TempDir() + "/nope")
	if err != nil || regs != nil {
		t.Fatalf("readServices(missing) = %v, %v", regs, err)
	}
}

func FuzzParseServices(f *testing.F) {
	f.Add(servicesSample)
	f.Add("x 1/tcp\n")
	f.Fuzz(func(t *testing.T, in string) {
		regs, err := parseServices(strings.NewReader(in))
		if err != nil {
			return
		}
		for _, r := range regs {
			if r.Port < 1 || r.Port > 65535 || (r.Proto != "tcp" && r.Proto != "udp") || r.Name == "" {
				t.Fatalf("bad registration %+v", r)
			}
		}
	})
}
