package buildinfo

import (
	"runtime/debug"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestFromBuildInfo(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/esro-emsdp/emsdp", Version: "v1.2.3"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123"},
			{Key: "vcs.time", Value: "2026-12-07T10:00:00Z"}, {Key: "vcs.modified", Value: "true"}}}
	i := fromBuildInfo(bi, true)
	if i.Version != "v1.2.3" || i.Revision != "0123456789abcdef0123" || i.Time != "2026-12-07T10:00:00Z" || !i.Modified || i.GoVersion != "go1.26.8" {
		t.Errorf("Info %+v", i)
	}
	if got := i.Short(); got != "emsdp v1.2.3 (0123456789ab, modified, go1.26.8)" {
		t.Errorf("Short %q", got)
	}
	for _, want := range []string{"emsdp v1.2.3\n", "revision: 0123456789abcdef0123 (modified)\n", "date:     2026-12-07T10:00:00Z\n", "go:       go1.26.8\n"} {
		if !strings.Contains(i.Long(), want) {
			t.Errorf("Long lacks %q:\n%s", want, i.Long())
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(i.Collector())
	want := `# HELP emsdp_build_info Build of the running emsdp: version, VCS revision and Go version in the labels; always 1.
# TYPE emsdp_build_info gauge
emsdp_build_info{goversion="go1.26.8",modified="true",revision="0123456789abcdef0123",version="v1.2.3"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}

	// A binary without build information still says something true.
	i = fromBuildInfo(nil, false)
	if i.Version != "(devel)" || i.Revision != "unknown" || i.GoVersion == "" || i.Platform == "" {
		t.Errorf("without build info: %+v", i)
	}
	// The test binary itself has build information.
	if r := Read(); r.Module == "" || r.GoVersion == "" {
		t.Errorf("Read: %+v", r)
	}
}
