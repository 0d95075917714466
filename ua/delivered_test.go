package ua

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/internal/testclock"
	"github.com/esro-emsdp/emsdp/ua/uatest"
)

// captureLog is a slog.Handler that keeps the records.
type captureLog struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (c *captureLog) Enabled(context.Context, slog.Level) bool { return true }
func (c *captureLog) Handle(_ context.Context, r slog.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.recs = append(c.recs, r)
	return nil
}
func (c *captureLog) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *captureLog) WithGroup(string) slog.Handler      { return c }

// count returns how many records at level lv have a message containing s.
func (c *captureLog) count(lv slog.Level, s string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, r := range c.recs {
		if r.Level == lv && strings.Contains(r.Message, s) {
			n++
		}
	}
	return n
}

var t0 = time.Date(2026, 11, 26, 8, 0, 0, 0, time.UTC)

// testDelivery is delivery n: its own message id, subject and body.
func testDelivery(n int) *Delivery {
	return &Delivery{MessageID: emsd.RFC822ID(fmt.Sprintf("<m%d@example.com>", n)), DeliveryTime: t0, SubmissionTime: t0.Add(-time.Minute),
		IPM: testIPM(fmt.Sprint("message ", n), []byte(fmt.Sprintf("body %d\n", n)))}
}

func openTestMaildir(t *testing.T, dir string, cfg MaildirConfig) *Maildir {
	t.Helper()
	if cfg.Domain == "" {
		cfg.Domain = "emsd.example"
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	md, err := OpenMaildir(dir, cfg)
	must(t, err)
	return md
}

// store stores d and reports whether it was written (false: recognised
// as already stored).
func store(t *testing.T, md *Maildir, d *Delivery) bool {
	t.Helper()
	path, err := md.Store(d)
	must(t, err)
	return path != ""
}

func countNew(t *testing.T, dir string) int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "new"))
	must(t, err)
	return len(ents)
}

func indexLines(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, DeliveredIndexName))
	must(t, err)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func TestDeliveryFingerprint(t *testing.T) {
	base := func() *Delivery {
		d := testDelivery(1)
		d.IPM.Heading.Recipients = append(d.IPM.Heading.Recipients, emsd.RecipientData{Recipient: emsd.RFC822OR("bob@example.com")})
		return d
	}
	// The same IPM as decoded from EMSD 1.0 octets (§4).
	decoded := func(o emsd.Options) func(*Delivery) {
		return func(d *Delivery) {
			b, err := d.IPM.Marshal(o)
			must(t, err)
			var ipm emsd.IPM
			must(t, ipm.Unmarshal(b, o))
			d.IPM = &ipm
		}
	}
	want, err := base().Fingerprint()
	must(t, err)
	for _, tc := range []struct {
		name   string
		change func(*Delivery)
		same   bool
	}{
		{"unchanged", func(*Delivery) {}, true},
		{"new delivery time", func(d *Delivery) { d.DeliveryTime = t0.Add(time.Hour) }, true},
		{"security element", func(d *Delivery) { d.Security = &emsd.SecurityElement{Password: "pw"} }, true},
		{"other server", func(d *Delivery) { d.From = netip.MustParseAddrPort("192.0.2.9:641") }, true},
		{"EMSD 1.0", func(d *Delivery) { d.Version = emsd.V1_0; decoded(emsd.Options{Version: emsd.V1_0})(d) }, true},
		{"other id", func(d *Delivery) { d.MessageID = emsd.RFC822ID("<m2@example.com>") }, false},
		{"local id", func(d *Delivery) { d.MessageID = emsd.LocalID(0x6b07d9d0, 7) }, false},
		{"other body", func(d *Delivery) { d.IPM.Body.Text = []byte("body 2\n") }, false},
		{"other subject", func(d *Delivery) { d.IPM.Heading.Subject = "message 2" }, false},
		{"one recipient fewer", func(d *Delivery) { d.IPM.Heading.Recipients = d.IPM.Heading.Recipients[:1] }, false},
		{"other submission time", func(d *Delivery) { d.SubmissionTime = d.SubmissionTime.Add(time.Second) }, false},
		{"no submission time", func(d *Delivery) { d.SubmissionTime = time.Time{} }, false},
	} {
		d := base()
		tc.change(d)
		got, err := d.Fingerprint()
		if err != nil || (got == want) != tc.same {
			t.Errorf("%s: %v (base %v), same=%v, want %v; %v", tc.name, got, want, got == want, tc.same, err)
		}
	}
	// A local id and an rfc822 id with the same text differ.
	a, b := testDelivery(1), testDelivery(1)
	a.MessageID, b.MessageID = emsd.LocalID(0x6b07d9d0, 7), emsd.RFC822ID(emsd.LocalID(0x6b07d9d0, 7).String())
	fa, _ := a.Fingerprint()
	fb, _ := b.Fingerprint()
	if fa == fb {
		t.Error("local and rfc822 ids with the same text have one fingerprint")
	}
	if _, err := (&Delivery{}).Fingerprint(); err == nil {
		t.Error("fingerprint of a delivery without IPM")
	}
	if s := want.String(); len(s) != 64 || strings.Trim(s, "0123456789abcdef") != "" {
		t.Errorf("String %q", s)
	}
}

// The MTS delivers a message, loses track of it, and delivers it again in
// a new attempt: new instance ids, delivery time and segment sequence. It
// is stored once, by the same client and by a new one (a restarted
// device) on the same Maildir; the MTS gets RESULT every time. A message
// with the same id and other contents is stored, as is one with the same
// contents and another id.
func TestMaildirRedelivery(t *testing.T) {
	for _, size := range []int{20, 4000} { // unsegmented and segmented (§8)
		t.Run(fmt.Sprint("body=", size), func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "Maildir")
			submitted := t0.Add(-time.Hour)
			deliver := func(m *uatest.MTS, d *device, id string, body []byte, at time.Duration) {
				t.Helper()
				err := m.Deliver(t.Context(), d.addr, emsd.RFC822ID(id), testIPM("hi", body),
					uatest.DeliverOptions{SubmissionTime: submitted, DeliveryTime: t0.Add(at)})
				if err != nil {
					t.Fatalf("%s at %v: %v", id, at, err)
				}
			}
			body := bytes.Repeat([]byte("x"), size)
			md := openTestMaildir(t, dir, MaildirConfig{})
			m, d := udpPair(t, Config{Handler: md})
			deliver(m, d, "<a@example.com>", body, 0)
			deliver(m, d, "<a@example.com>", body, time.Minute)
			if s := md.Stats(); s != (MaildirStats{Stored: 1, Duplicates: 1}) {
				t.Fatalf("stats %+v", s)
			}
			d.Close()

			// Restarted: a new client and a new Maildir value.
			md2 := openTestMaildir(t, dir, MaildirConfig{})
			m2, d2 := udpPair(t, Config{Handler: md2})
			deliver(m2, d2, "<a@example.com>", body, time.Hour)
			deliver(m2, d2, "<a@example.com>", append(body, 'y'), time.Hour) // same id, other contents
			deliver(m2, d2, "<b@example.com>", body, time.Hour)              // same contents, other id
			deliver(m2, d2, "<b@example.com>", body, 2*time.Hour)
			if s := md2.Stats(); s != (MaildirStats{Stored: 2, Duplicates: 2}) {
				t.Fatalf("stats after restart %+v", s)
			}
			if ids := maildirIDs(t, dir); len(ids) != 2 || ids["<a@example.com>"] != 2 || ids["<b@example.com>"] != 1 {
				t.Fatalf("maildir %v", ids)
			}
		})
	}
}

// Damaged index files: every valid line still counts, new entries are
// recorded on a line of their own, and the damage is logged once.
func TestDeliveredIndexDamaged(t *testing.T) {
	fp := func(n int) string {
		f, err := testDelivery(n).Fingerprint()
		must(t, err)
		return f.String()
	}
	now := fmt.Sprint(t0.Unix())
	for _, tc := range []struct {
		name    string
		content string
		damaged bool
	}{
		{"intact", fp(1) + " " + now + "\n" + fp(2) + " " + now + "\n", false},
		{"torn last line", fp(1) + " " + now + "\n" + fp(2) + " " + now + "\n" + fp(3)[:17], true},
		{"torn in the time", fp(1) + " " + now + "\n" + fp(2) + " " + now + "\n" + fp(3) + " " + now[:4], true},
		{"bad lines between", fp(1) + " " + now + "\n\n" + strings.ToUpper(fp(3)) + " " + now + "\n" + fp(3) + " 0" + now + "\n" +
			fp(3) + " " + now + "\r\n" + fp(3) + "\n" + "\x00\xff\n" + strings.Repeat("z", 10000) + "\n" + fp(2) + " " + now + "\n", true},
		{"long unterminated", fp(1) + " " + now + "\n" + fp(2) + " " + now + "\n" + strings.Repeat("a", 8192), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			must(t, os.WriteFile(filepath.Join(dir, DeliveredIndexName), []byte(tc.content), 0o600))
			logs := &captureLog{}
			cfg := MaildirConfig{Now: testclock.At(t0).Now, Logger: slog.New(logs)}
			md := openTestMaildir(t, dir, cfg)
			if store(t, md, testDelivery(1)) || store(t, md, testDelivery(2)) {
				t.Fatal("a valid entry was not recognised")
			}
			if !store(t, md, testDelivery(3)) || !store(t, md, testDelivery(4)) {
				t.Fatal("a new delivery was not stored")
			}
			warned := logs.count(slog.LevelWarn, "damaged")
			if want := map[bool]int{true: 1, false: 0}[tc.damaged]; warned != want {
				t.Fatalf("%d warnings, want %d", warned, want)
			}
			// Re-opened, every entry is there: the new ones did not join
			// the torn line.
			md = openTestMaildir(t, dir, cfg)
			for n := 1; n <= 4; n++ {
				if store(t, md, testDelivery(n)) {
					t.Fatalf("delivery %d stored again; index %q", n, indexLines(t, dir))
				}
			}
			if c := countNew(t, dir); c != 2 {
				t.Fatalf("%d messages stored, want 2", c)
			}
		})
	}
}

// Entries past retention are forgotten and compacted away; recent ones
// survive the compaction and re-opening.
func TestDeliveredIndexRetention(t *testing.T) {
	dir := t.TempDir()
	clk := testclock.At(t0)
	cfg := MaildirConfig{Now: clk.Now, Retention: 30 * 24 * time.Hour}
	md := openTestMaildir(t, dir, cfg)
	const old, recent = 100, 10
	for n := range old {
		store(t, md, testDelivery(n))
	}
	clk.Advance(20 * 24 * time.Hour)
	for n := old; n < old+recent; n++ {
		store(t, md, testDelivery(n))
	}
	if l := len(indexLines(t, dir)); l != old+recent {
		t.Fatalf("%d lines before expiry, want %d", l, old+recent)
	}
	clk.Advance(11 * 24 * time.Hour) // the first 100 are 31 days old
	if !store(t, md, testDelivery(-1)) {
		t.Fatal("new delivery not stored")
	}
	// 100 dead lines > max(11 live, compactSlack): rewritten.
	lines := indexLines(t, dir)
	want := map[string]bool{}
	for n := old; n < old+recent; n++ {
		f, _ := testDelivery(n).Fingerprint()
		want[f.String()+" "+fmt.Sprint(t0.Add(20*24*time.Hour).Unix())] = true
	}
	f, _ := testDelivery(-1).Fingerprint()
	want[f.String()+" "+fmt.Sprint(clk.Now().Unix())] = true
	if len(lines) != len(want) {
		t.Fatalf("%d lines after compaction, want %d", len(lines), len(want))
	}
	for _, l := range lines {
		if !want[l] {
			t.Fatalf("line %q after compaction", l)
		}
	}
	if tmp, _ := filepath.Glob(filepath.Join(dir, DeliveredIndexName+".tmp*")); len(tmp) != 0 {
		t.Fatalf("left behind: %v", tmp)
	}
	for i, md := range []*Maildir{md, openTestMaildir(t, dir, cfg)} {
		if !store(t, md, testDelivery(i)) {
			t.Fatal("an expired delivery was recognised")
		}
		if store(t, md, testDelivery(old)) || store(t, md, testDelivery(-1)) {
			t.Fatal("a recent delivery was stored again")
		}
	}
}

// At most MaxDelivered entries are remembered, and the file stays bounded.
func TestDeliveredIndexMax(t *testing.T) {
	dir := t.TempDir()
	cfg := MaildirConfig{Now: testclock.At(t0).Now, MaxDelivered: 10}
	md := openTestMaildir(t, dir, cfg)
	const total = 200
	for n := range total {
		if !store(t, md, testDelivery(n)) {
			t.Fatalf("delivery %d not stored", n)
		}
		if l := len(indexLines(t, dir)); l > 2*10+compactSlack+1 {
			t.Fatalf("%d lines after %d deliveries", l, n+1)
		}
	}
	md = openTestMaildir(t, dir, cfg)
	for n := total - 1; n >= total-15; n-- {
		if stored := store(t, md, testDelivery(n)); stored != (n < total-10) {
			t.Fatalf("delivery %d: stored %v", n, stored)
		}
	}
}

// Two processes on one Maildir see each other's entries.
func TestDeliveredIndexShared(t *testing.T) {
	dir := t.TempDir()
	a := openTestMaildir(t, dir, MaildirConfig{})
	b := openTestMaildir(t, dir, MaildirConfig{})
	if !store(t, a, testDelivery(1)) || store(t, b, testDelivery(1)) {
		t.Fatal("b stored what a had stored")
	}
	if !store(t, b, testDelivery(2)) || store(t, a, testDelivery(2)) {
		t.Fatal("a stored what b had stored")
	}
	// The index removed by hand: both start afresh.
	must(t, os.Remove(filepath.Join(dir, DeliveredIndexName)))
	if !store(t, a, testDelivery(1)) || store(t, b, testDelivery(1)) {
		t.Fatal("after removal")
	}
}

// An index that cannot be read or written never fails a delivery: the
// message is stored, and recognised by this process only.
func TestDeliveredIndexUnwritable(t *testing.T) {
	dir := t.TempDir()
	must(t, os.Mkdir(filepath.Join(dir, DeliveredIndexName), 0o700))
	logs := &captureLog{}
	md := openTestMaildir(t, dir, MaildirConfig{Logger: slog.New(logs)})
	if !store(t, md, testDelivery(1)) || store(t, md, testDelivery(1)) || !store(t, md, testDelivery(2)) {
		t.Fatal("stored wrong")
	}
	if n := logs.count(slog.LevelError, "recording a stored delivery"); n != 2 {
		t.Fatalf("%d index errors logged", n)
	}
	// Restarted, it stores a re-delivery again: a duplicate, not a loss.
	if !store(t, openTestMaildir(t, dir, MaildirConfig{}), testDelivery(1)) {
		t.Fatal("recognised without an index")
	}
	if c := countNew(t, dir); c != 3 {
		t.Fatalf("%d stored", c)
	}
}

func TestMaildirKeepDuplicates(t *testing.T) {
	dir := t.TempDir()
	md := openTestMaildir(t, dir, MaildirConfig{KeepDuplicates: true})
	if !store(t, md, testDelivery(1)) || !store(t, md, testDelivery(1)) {
		t.Fatal("duplicate not stored")
	}
	if _, err := os.Stat(filepath.Join(dir, DeliveredIndexName)); !os.IsNotExist(err) {
		t.Fatalf("index written: %v", err)
	}
	for _, cfg := range []MaildirConfig{{}, {Domain: "x", Retention: -1}, {Domain: "x", MaxDelivered: -1}} {
		if _, err := OpenMaildir(dir, cfg); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
}

// FuzzParseIndexLine: never panics, and accepts only what
// appendIndexLine writes.
func FuzzParseIndexLine(f *testing.F) {
	fp, _ := testDelivery(1).Fingerprint()
	for _, s := range []string{string(appendIndexLine(nil, fp, t0.Unix())), string(appendIndexLine(nil, fp, -5)),
		fp.String() + " 01\n", fp.String() + " +1\n", fp.String() + "  1\n", fp.String()[:63] + " 1", "", " ", "\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		fp, ts, ok := parseIndexLine(line)
		if !ok {
			return
		}
		if back := appendIndexLine(nil, fp, ts); !bytes.Equal(back, line) && !bytes.Equal(back[:len(back)-1], line) {
			t.Fatalf("%q parsed as %v %d, written %q", line, fp, ts, back)
		}
	})
}

// FuzzDeliveredIndex: any index file is read without failing or
// panicking, and what is stored afterwards is recognised after re-opening.
func FuzzDeliveredIndex(f *testing.F) {
	fp, _ := testDelivery(1).Fingerprint()
	f.Add([]byte(string(appendIndexLine(nil, fp, t0.Unix())) + "abc"))
	f.Add([]byte("\x00\n\n" + strings.Repeat("f", 64) + " 99999999999999999999\n"))
	f.Fuzz(func(t *testing.T, content []byte) {
		dir := t.TempDir()
		must(t, os.WriteFile(filepath.Join(dir, DeliveredIndexName), content, 0o600))
		cfg := MaildirConfig{Domain: "emsd.example", Now: testclock.At(t0).Now, Logger: slog.New(slog.DiscardHandler), MaxDelivered: 3}
		md, err := OpenMaildir(dir, cfg)
		must(t, err)
		for n := 2; n < 5; n++ {
			if _, err := md.Store(testDelivery(n)); err != nil {
				t.Fatal(err)
			}
		}
		md, err = OpenMaildir(dir, cfg)
		must(t, err)
		for n := 2; n < 5; n++ {
			if path, err := md.Store(testDelivery(n)); path != "" || err != nil {
				t.Fatalf("delivery %d stored again (%v); index %q", n, err, indexLines(t, dir))
			}
		}
	})
}

// A compaction removes the temporary files that crashed compactions left
// behind, but not one young enough to be another process's under way.
func TestDeliveredIndexStaleTemps(t *testing.T) {
	dir := t.TempDir()
	old := filepath.Join(dir, DeliveredIndexName+".tmp123")
	young := filepath.Join(dir, DeliveredIndexName+".tmp456")
	other := filepath.Join(dir, "unrelated.tmp789")
	for _, f := range []string{old, young, other} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	past := time.Now().Add(-2 * staleTempAge)
	for _, f := range []string{old, other} {
		if err := os.Chtimes(f, past, past); err != nil {
			t.Fatal(err)
		}
	}
	x := newDeliveredIndex(dir, DefaultDeliveredRetention, DefaultDeliveredMax, slog.New(slog.DiscardHandler))
	if err := x.compact(); err != nil {
		t.Fatal(err)
	}
	for f, want := range map[string]bool{old: false, young: true, other: true} {
		if _, err := os.Stat(f); (err == nil) != want {
			t.Errorf("%s exists = %v, want %v", filepath.Base(f), err == nil, want)
		}
	}
}
