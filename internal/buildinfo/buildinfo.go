// Package buildinfo says which build of emsdp is running: the module
// version, the VCS revision and commit time the Go tool stamped into the
// binary, and the Go version, for `emsdp version` and the
// emsdp_build_info metric.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// Info describes one build. Fields the build did not record are
// "unknown" (Revision, Time) or "(devel)" (Version of a build from a
// work tree).
type Info struct {
	Module    string `json:"module"`
	Version   string `json:"version"`
	Revision  string `json:"revision"`
	Time      string `json:"time"`
	Modified  bool   `json:"modified"`
	GoVersion string `json:"go"`
	Platform  string `json:"platform"`
}

// Read returns the running binary's build information.
func Read() Info {
	bi, ok := debug.ReadBuildInfo()
	return fromBuildInfo(bi, ok)
}

func fromBuildInfo(bi *debug.BuildInfo, ok bool) Info {
	i := Info{Module: "github.com/esro-emsdp/emsdp", Version: "(devel)", Revision: "unknown", Time: "unknown",
		GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if !ok || bi == nil {
		return i
	}
	if bi.Main.Path != "" {
		i.Module = bi.Main.Path
	}
	if bi.Main.Version != "" {
		i.Version = bi.Main.Version
	}
	if bi.GoVersion != "" {
		i.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			i.Revision = s.Value
		case "vcs.time":
			i.Time = s.Value
		case "vcs.modified":
			i.Modified = s.Value == "true"
		}
	}
	return i
}

// Short is "emsdp VERSION (REVISION[, modified], GO)".
func (i Info) Short() string {
	rev := i.Revision
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if i.Modified {
		rev += ", modified"
	}
	return fmt.Sprintf("emsdp %s (%s, %s)", i.Version, rev, i.GoVersion)
}

// Long is one "key: value" line per field.
func (i Info) Long() string {
	var b strings.Builder
	fmt.Fprintf(&b, "emsdp %s\n", i.Version)
	fmt.Fprintf(&b, "module:   %s\n", i.Module)
	rev := i.Revision
	if i.Modified {
		rev += " (modified)"
	}
	fmt.Fprintf(&b, "revision: %s\n", rev)
	fmt.Fprintf(&b, "date:     %s\n", i.Time)
	fmt.Fprintf(&b, "go:       %s\n", i.GoVersion)
	fmt.Fprintf(&b, "platform: %s\n", i.Platform)
	return b.String()
}

// Collector is the emsdp_build_info gauge: always 1, the build in its
// labels, so that dashboards can join it and see upgrades.
func (i Info) Collector() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "emsdp_build_info",
		Help: "Build of the running emsdp: version, VCS revision and Go version in the labels; always 1.",
		ConstLabels: prometheus.Labels{"version": i.Version, "revision": i.Revision,
			"modified": fmt.Sprint(i.Modified), "goversion": i.GoVersion},
	}, func() float64 { return 1 })
}
