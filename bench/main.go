// Command bench measures esro-emsdp side by side with its modern peers, in
// one run on one machine, and prints Markdown tables (and writes JSON):
//
//	go run -C bench .                 # every section, default durations
//	go run -C bench . -sections esro  # only some sections
//	go run -C bench . -quick          # shorter runs, for a smoke test
//	go run -C bench . -md perf.md     # also write the Markdown to a file
//
// The Markdown is the README's Performance section as it stands: paste it
// over the old one to update the numbers. Every figure comes with its
// conditions. Figures from one run are only comparable with each other;
// ratios are the point.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Result is one measured figure set.
type Result struct {
	Section    string             `json:"section"`
	Name       string             `json:"name"`
	Conditions map[string]string  `json:"conditions"`
	Metrics    map[string]float64 `json:"metrics"`
	Units      map[string]string  `json:"units"`
	condOrder  []string           // conditions in the order given
	order      []string           // metrics in the order they were set
}

// newResult starts a result with conditions given as name, value pairs;
// tables show them in this order.
func newResult(section, name string, conds ...string) Result {
	r := Result{Section: section, Name: name, Conditions: map[string]string{}, Metrics: map[string]float64{}, Units: map[string]string{}}
	for i := 0; i+1 < len(conds); i += 2 {
		r.Conditions[conds[i]] = conds[i+1]
		r.condOrder = append(r.condOrder, conds[i])
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

// report is what a section measured, as one or more tables, with notes on
// the conditions that apply to all of its rows.
type report struct {
	tables []table
	notes  []string
}

// table is a set of rows with the same columns; caption may be empty.
type table struct {
	caption string
	results []Result
}

func (r *report) results() []Result {
	var all []Result
	for _, t := range r.tables {
		all = append(all, t.results...)
	}
	return all
}

type section struct {
	name  string
	title string
	run   func(ctx context.Context, o *benchOptions) (*report, error)
}

type benchOptions struct {
	quick    bool
	duration time.Duration // per load point
	log      *slog.Logger  // the benchmark's own diagnostics
	srvLog   *slog.Logger  // the EMSD server's and devices' logs: errors only
}

func sections() []section {
	return []section{
		{"esro", "ESRO vs CoAP (go-coap v3, CON POST) over loopback UDP", runESROvsCoAP},
		{"mail", "One message: EMSD vs SMTP on the wire", runMail},
		{"loss", "1000 invocations through a lossy link: adaptive vs fixed timers", runLoss},
		{"server", "EMSD server: submissions end to end, memory per invocation", runServer},
		{"hostile", "Hostile networks: reflection, floods, password checks, unreachable peers", runHostile},
		{"dtls", "Security: EMSD and ESRO over DTLS", runDTLS},
		{"linger", "ua send through a lossy link: staying to re-acknowledge", runLinger},
		{"fleet", "Delivery to a fleet with devices switched off", runFleet},
		{"registry", "A large device registry: writing it, starting with it", runRegistry},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	var code int
	if len(os.Args) > 1 && os.Args[1] == netemChildArg {
		code = netemChild(ctx, os.Args[2:], os.Stdin, os.Stdout, os.Stderr)
	} else {
		code = run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	}
	stop()
	os.Exit(code)
}

// jsonSection is one section in the JSON output.
type jsonSection struct {
	Name    string   `json:"name"`
	Title   string   `json:"title"`
	Notes   []string `json:"notes,omitempty"`
	Results []Result `json:"results"`
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	which := fs.String("sections", "", "comma-separated sections to run (default all: esro,mail,loss,server,hostile,dtls,linger,fleet,registry)")
	out := fs.String("json", "bench-results.json", "write the results here as JSON ('' = don't)")
	md := fs.String("md", "", "also write the Markdown (the README's Performance section) to this file")
	quick := fs.Bool("quick", false, "short runs (a smoke test, not figures to quote)")
	dur := fs.Duration("duration", 2*time.Second, "measuring time per load point")
	cpuprof := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "bench: unexpected arguments %q\n", fs.Args())
		return 2
	}
	o := &benchOptions{quick: *quick, duration: *dur,
		log:    slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		srvLog: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelError}))}
	if o.quick {
		o.duration = 300 * time.Millisecond
	}
	var want []string
	if *which != "" {
		want = strings.Split(*which, ",")
		for _, w := range want {
			if !slices.ContainsFunc(sections(), func(s section) bool { return s.name == w }) {
				fmt.Fprintf(stderr, "bench: no section %q\n", w)
				return 2
			}
		}
	}
	if *cpuprof != "" {
		f, err := os.Create(*cpuprof)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(stderr, "bench: cpu profile:", err)
			return 1
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	var buf strings.Builder
	w := io.MultiWriter(stdout, &buf)
	quickNote := ""
	if o.quick {
		quickNote = " **-quick: smoke-test figures, not for quoting.**"
	}
	fmt.Fprintf(w, "## Performance\n\nMeasured by `go run -C bench .` (%s, %s/%s, %d CPUs, %s); regenerate this section with "+
		"`go run -C bench . -md FILE`, FILE relative to bench/. Figures of one run are comparable with each other, not with other machines: "+
		"the ratios are the point.%s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(),
		time.Now().UTC().Format("2006-01-02"), quickNote)
	var all []jsonSection
	for _, s := range sections() {
		if want != nil && !slices.Contains(want, s.name) {
			continue
		}
		fmt.Fprintf(stderr, "bench: %s ...\n", s.name)
		start := time.Now()
		rep, err := s.run(ctx, o)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %s: %v\n", s.name, err)
			return 1
		}
		fmt.Fprintf(stderr, "bench: %s took %v\n", s.name, time.Since(start).Round(time.Second))
		fmt.Fprintf(w, "\n### %s\n", s.title)
		for _, t := range rep.tables {
			if t.caption != "" {
				fmt.Fprintf(w, "\n%s\n", t.caption)
			}
			fmt.Fprintln(w)
			printTable(w, t.results)
		}
		if len(rep.notes) > 0 {
			fmt.Fprintln(w)
			for _, n := range rep.notes {
				fmt.Fprintf(w, "- %s\n", n)
			}
		}
		all = append(all, jsonSection{Name: s.name, Title: s.title, Notes: rep.notes, Results: rep.results()})
	}
	if *md != "" {
		if err := os.WriteFile(*md, []byte(buf.String()), 0o644); err != nil {
			fmt.Fprintln(stderr, "bench:", err)
			return 1
		}
	}
	if *out != "" {
		b, err := json.MarshalIndent(all, "", "  ")
		if err == nil {
			err = os.WriteFile(*out, append(b, '\n'), 0o644)
		}
		if err != nil {
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
		for _, k := range r.condOrder {
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

func formatMetric(v float64) string {
	switch {
	case v == math.Trunc(v) && math.Abs(v) < 1e15:
		return strconv.FormatFloat(v, 'f', 0, 64) // counts
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}
