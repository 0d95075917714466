// Command bench measures esro-emsdp side by side with its modern peers, in
// one run on one machine, and prints a Markdown table (and writes JSON):
//
//	go run ./bench                 # every section, default durations
//	go run ./bench -sections esro  # only some sections
//	go run ./bench -quick          # shorter runs, for a smoke test
//
// Every figure comes with its conditions. Figures from one run are only
// comparable with each other; ratios are the point.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Result is one measured figure set.
type Result struct {
	Section    string             `json:"section"`
	Name       string             `json:"name"`
	Conditions map[string]string  `json:"conditions"`
	Metrics    map[string]float64 `json:"metrics"`
	Units      map[string]string  `json:"units"`
	order      []string           // metrics in the order they were set
}

func newResult(section, name string, conds ...string) Result {
	r := Result{Section: section, Name: name, Conditions: map[string]string{}, Metrics: map[string]float64{}, Units: map[string]string{}}
	for i := 0; i+1 < len(conds); i += 2 {
		r.Conditions[conds[i]] = conds[i+1]
	}
	return r
}

// set records a metric with its unit.
func (r *Result) set(name string, v float64, unit string) {
	if _, ok := r.Metrics[name]; !ok {
		r.order = append(r.order, name)
	}
	r.Metrics[name] = v
	if unit != "" {
		r.Units[name] = unit
	}
}

type section struct {
	name  string
	title string
	run   func(ctx context.Context, o *benchOptions) ([]Result, error)
}

type benchOptions struct {
	quick    bool
	duration time.Duration // per load point
	log      *slog.Logger
}

func sections() []section {
	return []section{
		{"esro", "ESRO vs CoAP (go-coap v3, CON POST) over loopback UDP", runESROvsCoAP},
		{"loss", "1000 invocations through a lossy link: adaptive vs fixed timers", runLoss},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	which := fs.String("sections", "", "comma-separated sections to run (default all)")
	out := fs.String("json", "bench-results.json", "write the results here as JSON ('' = don't)")
	quick := fs.Bool("quick", false, "short runs (a smoke test, not figures to quote)")
	dur := fs.Duration("duration", 2*time.Second, "measuring time per load point")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	o := &benchOptions{quick: *quick, duration: *dur, log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	if o.quick {
		o.duration = 300 * time.Millisecond
	}
	var want []string
	if *which != "" {
		want = strings.Split(*which, ",")
	}
	var all []Result
	fmt.Fprintf(stdout, "# esro-emsdp benchmarks\n\n%s, %s/%s, %d CPUs, %s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), time.Now().UTC().Format(time.RFC3339))
	for _, s := range sections() {
		if want != nil && !slices.Contains(want, s.name) {
			continue
		}
		fmt.Fprintf(stderr, "bench: %s ...\n", s.name)
		res, err := s.run(ctx, o)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %s: %v\n", s.name, err)
			return 1
		}
		fmt.Fprintf(stdout, "\n## %s\n\n", s.title)
		printTable(stdout, res)
		all = append(all, res...)
	}
	if *out != "" {
		b, _ := json.MarshalIndent(all, "", "  ")
		if err := os.WriteFile(*out, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			return 1
		}
	}
	return 0
}

// printTable renders results of one section: conditions, then metrics, as
// columns in first-seen order.
func printTable(w io.Writer, res []Result) {
	var conds, mets []string
	for _, r := range res {
		for _, k := range sortedKeys(r.Conditions) {
			if !slices.Contains(conds, k) {
				conds = append(conds, k)
			}
		}
		for _, k := range r.order {
			if !slices.Contains(mets, k) {
				mets = append(mets, k)
			}
		}
	}
	head := append([]string{"run"}, conds...)
	for _, m := range mets {
		if u := unitOf(res, m); u != "" {
			m += " (" + u + ")"
		}
		head = append(head, m)
	}
	fmt.Fprintf(w, "| %s |\n|%s\n", strings.Join(head, " | "), strings.Repeat(" --- |", len(head)))
	for _, r := range res {
		row := []string{r.Name}
		for _, c := range conds {
			row = append(row, r.Conditions[c])
		}
		for _, m := range mets {
			v, ok := r.Metrics[m]
			if !ok {
				row = append(row, "")
				continue
			}
			row = append(row, formatMetric(v))
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
	}
}

func unitOf(res []Result, m string) string {
	for _, r := range res {
		if u := r.Units[m]; u != "" {
			return u
		}
	}
	return ""
}

func sortedKeys[V any](m map[string]V) []string {
	ks := slices.Collect(maps.Keys(m))
	slices.Sort(ks)
	return ks
}

func formatMetric(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}
