package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/internal/pgtest"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

// queueFill queues, through the store API as a server would, deliveries
// and relays in the states the queue commands deal with, and returns
// their ids as the commands print them: "a" (a delivery to 198.037,
// deferred with an error), "b" (to 198.038, in flight), "c" (to 198.039,
// failed), "x" (a relay to bob@example.com) and "z" (a DSN relay). The
// in-flight delivery stays claimed, as by a server that went away.
func queueFill(t *testing.T, db store.Store) (ids map[string]string) {
	t.Helper()
	ctx := context.Background()
	now := time.Now()
	ipm := &emsd.IPM{Heading: emsd.Heading{Originator: emsd.LocalOR(198036, ""), Subject: "Lunch",
		Recipients: []emsd.RecipientData{{Recipient: emsd.LocalOR(198037, "")}}}, Body: &emsd.Body{Text: []byte("Lunch at noon?\n")}}
	content, err := ipm.Marshal(emsd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := uint32(0x6b080580)
	d := func(dev uint32, id string) store.NewDelivery {
		return store.NewDelivery{Device: dev, MessageID: id, SubmissionTime: &st, ContentType: uint32(emsd.ContentIPM),
			Content: content, Priority: 1, NextAttempt: now, Expires: now.Add(time.Hour),
			Report: store.Report{Device: 198036, Flags: 0x20, Recipient: "L:198037", MessageID: id}}
	}
	msg := []byte("From: 198.036@emsd.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <EMSD.6b080580.00000002@emsd.test>\r\n\r\nHi\r\n")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(db.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{d(198037, "L:6b080580.00000001"), d(198038, "R:<b@example.com>"), d(198039, "L:6b080580.00000003")},
		Relays: []store.NewRelay{
			{From: "198.036@emsd.test", Message: msg, NextAttempt: now.Add(time.Hour), Expires: now.Add(2 * time.Hour),
				Recipients: []store.RelayRecipient{{Addr: "bob@example.com", Report: store.Report{Device: 198036, MessageID: "L:6b080580.00000002"}}}},
			{Message: []byte("Subject: Delivery Status Notification\r\n\r\n"), NextAttempt: now.Add(time.Hour),
				Expires: now.Add(2 * time.Hour), Recipients: []store.RelayRecipient{{Addr: "carol@example.com"}}},
		},
	}))
	// 198.037 is registered without IP address and was heard 3 minutes
	// ago (behind a NAT); the others are not registered.
	must(db.AddDevice(ctx, &store.Device{Address: 198037, PasswordHash: "h", Version: "1.1", Mode: store.ModeComplete}))
	_, _, err = db.SetContact(ctx, 198037, store.Contact{Addr: netip.MustParseAddrPort("192.0.2.9:40123"), Via: "mts1 127.0.0.1:641",
		At: now.Add(-3 * time.Minute), Polled: true})
	must(err)
	ids = map[string]string{}
	claim := func(dev uint32, name string) *store.Delivery {
		t.Helper()
		c, err := db.ClaimDelivery(ctx, dev, now, store.Limits{})
		must(err)
		ids[name] = fmt.Sprint("D", c.ID)
		return c
	}
	a := claim(198037, "a")
	must(db.FinishDelivery(ctx, a.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryQueued,
		NextAttempt: now.Add(time.Hour), Error: "failure reason=2 user not responding"}))
	claim(198038, "b") // left in flight
	c := claim(198039, "c")
	must(db.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryFailed,
		Error: "device answered ERROR 7 (parameter 2)"}))
	l, err := db.ListQueue(ctx, store.QueueFilter{Kind: store.QueueRelay})
	must(err)
	for _, e := range l.Entries {
		ids[map[string]string{"bob@example.com": "x", "carol@example.com": "z"}[e.Recipient]] = fmt.Sprint("R", e.Ref.ID)
	}
	return ids
}

// The queue commands on a store a server works on: what list and show
// print, what retry and remove do and refuse, and their exit codes.
func TestQueueCommands(t *testing.T) {
	pg, err := pgtest.Start(context.Background(), pgtest.Options{NoFsync: true})
	if err != nil {
		t.Fatalf("PostgreSQL server for the test: %v", err) // CI installs it: fail, do not skip
	}
	t.Cleanup(func() {
		if err := pg.Stop(); err != nil {
			t.Error(err)
		}
	})
	for _, backend := range []struct {
		name  string
		flags func(t *testing.T) []string
	}{
		{"sqlite", func(t *testing.T) []string { return []string{"--data", t.TempDir()} }},
		{"postgres", func(t *testing.T) []string { return []string{"--dsn", pg.NewDatabase(t)} }},
	} {
		t.Run(backend.name, func(t *testing.T) {
			flags := backend.flags(t)
			ds := &deviceStore{}
			if flags[0] == "--data" {
				ds.data = flags[1]
			} else {
				ds.conninfo = flags[1]
			}
			db, err := ds.open(context.Background(), &cmdEnv{stderr: io.Discard}, open.Create)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			ids := queueFill(t, db) // the in-flight claim stays: testQueueForce takes it back
			testQueueCommands(t, db, flags, ids)
			testQueueForce(t, db, flags, ids["b"])
		})
	}
}

func testQueueCommands(t *testing.T, db store.Store, flags []string, ids map[string]string) {
	a, b, c, x, z := ids["a"], ids["b"], ids["c"], ids["x"], ids["z"]
	q := func(args ...string) []string { return append(append([]string{"queue"}, args...), flags...) }
	const tm = `\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ`
	row := func(id, kind, state, to, msgid, size, attempts, next, lastErr string) string {
		return `(?m)^` + id + ` +` + kind + ` +` + state + ` +` + regexp.QuoteMeta(to) + ` +` + regexp.QuoteMeta(msgid) + ` +` +
			size + ` +` + attempts + ` +` + tm + ` +` + next + ` +` + tm + ` +` + regexp.QuoteMeta(lastErr) + `$`
	}
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout []string // regexps, all must match
		not    []string // regexps that must not match stdout
		stderr string   // substring
	}{
		{"list", q("list"), exitOK, []string{
			`^ID +KIND +STATE +TO +MESSAGE-ID +SIZE +ATTEMPTS +QUEUED +NEXT-ATTEMPT +EXPIRES +LAST-ERROR\n`,
			row(a, "delivery", "queued", "198.037", "6b080580.00000001", `\d+`, "1", tm, "failure reason=2 user not responding"),
			row(b, "delivery", "inflight", "198.038", "<b@example.com>", `\d+`, "1", "-", "-"),
			row(x, "relay", "queued", "bob@example.com", "6b080580.00000002", `\d+`, "0", tm, "-"),
			row(z, "relay", "queued", "carol@example.com", "-", "41", "0", tm, "-"),
			`\n-- 4 entries: delivery queued=1 inflight=1, relay queued=2\n$`}, []string{`(?m)^` + c + ` `}, ""},
		{"list failed", q("list", "--state", "failed"), exitOK, []string{
			row(c, "delivery", "failed", "198.039", "6b080580.00000003", `\d+`, "1", "-", "device answered ERROR 7 (parameter 2)"),
			`\n-- 1 entry: delivery failed=1\n$`}, nil, ""},
		{"list one device", q("list", "--device", "198.037", "--state", "all"), exitOK, []string{`(?m)^` + a + ` `,
			`\n-- 1 entry: delivery queued=1\n-- device 198\.037 heard: 192\.0\.2\.9:40123, 3m\d+s ago \(\d{4}-\d\d-\d\d ` +
				`\d\d:\d\d:\d\dZ\), by mts1 127\.0\.0\.1:641 in a poll; longer ago than delivery.contact_lifetime 2m0s: offline: deliveries wait until it is heard again\n$`},
			[]string{`(?m)^R`}, ""},
		{"list relays", q("list", "--relays"), exitOK, []string{`(?m)^` + x + ` `, `(?m)^` + z + ` `,
			`\n-- 2 entries: relay queued=2\n$`}, []string{`(?m)^D`}, ""},
		{"list in flight", q("list", "--deliveries", "--state", "sending"), exitOK, []string{`(?m)^` + b + ` `,
			`\n-- 1 entry: delivery inflight=1\n$`}, nil, ""},
		{"list cut", q("list", "--limit", "1"), exitOK, []string{`(?m)^` + a + ` `,
			`\n-- 4 entries: .*\n-- listing cut at 1 of 4 entries \(--limit\)\n$`}, []string{`(?m)^` + b + ` `}, ""},
		{"show delivery", q("show", a), exitOK, []string{
			`^id: +` + a + `\nkind: +delivery\nstate: +queued\ndevice: +198\.037\nmessage-id: +6b080580\.00000001\n` +
				`content-type: +32 \(ipm95\)\npriority: +1 \(normal\)\nsubmission-time: +` + tm + `\nsize: +\d+ octets\n` +
				`attempts: +1\nqueued: +` + tm + `\nupdated: +` + tm + `\nnext-attempt: +` + tm + `\nexpires: +` + tm + `\n` +
				`last-error: +failure reason=2 user not responding\nreport-to: +device 198\.036\nreport-flags: +0x20\n` +
				`report-recipient: +198\.037\nreport-message-id: +6b080580\.00000001\nreport-headers: +-\n` +
				`subject: +"Lunch"\nfrom: +198\.036\ndevice-heard: +192\.0\.2\.9:40123, 3m\d+s ago .*\n$`}, nil, ""},
		{"show unregistered", q("show", c), exitOK, []string{`\ndevice-heard: +- \(the device is no longer registered\)\n$`}, nil, ""},
		{"show relay", q("show", strings.ToLower(x)), exitOK, []string{`(?m)^recipient: +bob@example\.com$`,
			`(?m)^envelope-from: +198\.036@emsd\.test$`, `(?m)^message-id: +6b080580\.00000002$`,
			`(?m)^header-message-id: +<EMSD\.6b080580\.00000002@emsd\.test>$`, `(?m)^header-subject: +"Grüße"$`,
			`(?m)^report-to: +device 198\.036$`}, nil, ""},
		{"show DSN", q("show", z), exitOK, []string{`(?m)^envelope-from: +<> \(null sender: a report\)$`,
			`(?m)^message-id: +-$`, `(?m)^report-to: +-$`}, nil, ""},
		{"show unknown", q("show", "D987654"), exitFailed, []string{`^$`}, nil, "no queue entry D987654"},
		{"show bad id", q("show", "987654"), exitUsage, []string{`^$`}, nil, `queue id "987654": want D<number>`},
		{"show two", q("show", a, b), exitUsage, []string{`^$`}, nil, "give one queue id"},

		{"retry", q("retry", a, b, c, "D987654", a), exitFailed, []string{
			`^retried 1 entry: due now\n` + b + ` is in flight \(a server is attempting it now\): left alone \(--force takes it back\)\n` +
				`note: a running emsdp serve picks this up within 30 s, or at once on SIGHUP \(systemctl reload\)\n$`}, nil,
			"emsdp: " + c + " is failed: not retried (finished entries stay finished)\nemsdp: no queue entry D987654\n"},
		{"retried", q("list", "--device", "198.037"), exitOK, []string{
			row(a, "delivery", "queued", "198.037", "6b080580.00000001", `\d+`, "1", tm, "failure reason=2 user not responding")}, nil, ""},
		{"retry busy device", q("retry", "--device", "198.038"), exitOK, []string{
			`^retried 0 entries: due now\n1 in flight \(a server is attempting them now\): left alone \(--force takes them back\)\n$`}, nil, ""},
		{"retry all", q("retry", "--all"), exitOK, []string{`^retried 3 entries: due now\n1 in flight .*\nnote: `}, nil, ""},
		{"remove in flight", q("remove", b), exitFailed, []string{`^removed 0 entries \(silently: no report to the sender\)\n$`}, nil,
			"emsdp: " + b + " is in flight (a server is attempting it now): not removed; remove it once it is back in the queue\n"},
		{"remove", q("remove", a, x), exitOK, []string{`^removed 2 entries \(silently: no report to the sender\)\n$`}, nil, ""},
		{"remove again", q("remove", a, c), exitFailed, []string{`^removed 0 entries`}, nil,
			"emsdp: no queue entry " + a + "\nemsdp: " + c + " is failed: not removed (only queued entries can be)\n"},
		{"removed", q("list", "--state", "all"), exitOK, []string{`(?m)^` + b + ` `, `(?m)^` + c + ` `, `(?m)^` + z + ` `,
			`\n-- 3 entries: delivery inflight=1 failed=1, relay queued=1\n$`},
			[]string{`(?m)^` + a + ` `, `(?m)^` + x + ` `}, ""},

		{"no subcommand", []string{"queue"}, exitUsage, []string{`^$`}, nil, "usage: emsdp queue list|show|retry|remove"},
		{"unknown subcommand", []string{"queue", "flush"}, exitUsage, []string{`^$`}, nil, "usage:"},
		{"retry nothing", q("retry"), exitUsage, []string{`^$`}, nil, "give queue ids (D<number>, R<number>), --all or --device"},
		{"retry two ways", q("retry", "--all", a), exitUsage, []string{`^$`}, nil, "one of them"},
		{"retry bad device", q("retry", "--device", "0"), exitUsage, []string{`^$`}, nil, `--device "0"`},
		{"remove nothing", q("remove"), exitUsage, []string{`^$`}, nil, "give the ids of the entries to remove"},
		{"remove bad id", q("remove", "X1"), exitUsage, []string{`^$`}, nil, `queue id "X1"`},
		{"remove negative", q("remove", "D-1"), exitUsage, []string{`^$`}, nil, `queue id "D-1"`},
		{"both kinds", q("list", "--deliveries", "--relays"), exitUsage, []string{`^$`}, nil, "exclude each other"},
		{"device of relays", q("list", "--relays", "--device", "1.2"), exitUsage, []string{`^$`}, nil, "--device selects deliveries"},
		{"bad state", q("list", "--state", "queued,lost"), exitUsage, []string{`^$`}, nil, `--state "lost"`},
		{"bad limit", q("list", "--limit", "0"), exitUsage, []string{`^$`}, nil, "--limit 0"},
		{"bad flag", q("list", "--nope"), exitUsage, []string{`^$`}, nil, "flag provided but not defined"},
		{"list argument", q("list", a), exitUsage, []string{`^$`}, nil, "unexpected argument"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := runCmd(t, "", tc.args...)
			bad := code != tc.code || !strings.Contains(errs, tc.stderr)
			for _, re := range tc.stdout {
				bad = bad || !regexp.MustCompile(re).MatchString(out)
			}
			for _, re := range tc.not {
				bad = bad || regexp.MustCompile(re).MatchString(out)
			}
			if bad {
				t.Errorf("%v: exit %d (want %d)\nstdout:\n%s\nstderr:\n%s", tc.args, code, tc.code, out, errs)
			}
		})
	}

	// Retry made the deferred delivery due; the in-flight one kept its claim.
	e, err := db.QueueEntry(context.Background(), store.QueueRef{Kind: store.QueueDelivery, ID: refID(t, b)})
	if err != nil || e.State != "inflight" || e.Attempts != 1 {
		t.Errorf("in-flight delivery after retry and remove: %+v %v", e, err)
	}

	// --json: the documented fields.
	code, out, errs := runCmd(t, "", q("list", "--json", "--state", "all")...)
	if code != exitOK {
		t.Fatalf("list --json: exit %d %s", code, errs)
	}
	var doc struct {
		Entries []struct {
			ID, Kind, State, Device, Recipient string
			MessageID                          string `json:"message_id"`
			LastError                          string `json:"last_error"`
			From                               *string
			Size, Attempts                     int
			QueuedAt                           time.Time `json:"queued_at"`
			Expires                            time.Time
			NextAttempt                        *time.Time `json:"next_attempt"`
		}
		Counts    map[string]map[string]int
		Matched   int
		Truncated bool
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("list --json: %v\n%s", err, out)
	}
	if len(doc.Entries) != 3 || doc.Matched != 3 || doc.Truncated || doc.Counts["delivery"]["failed"] != 1 ||
		doc.Counts["relay"]["queued"] != 1 {
		t.Fatalf("list --json: %s", out)
	}
	for _, e := range doc.Entries {
		switch e.ID {
		case b:
			if e.Kind != "delivery" || e.State != "inflight" || e.Device != "198.038" || e.NextAttempt != nil || e.From != nil ||
				e.Attempts != 1 || e.QueuedAt.IsZero() || e.Expires.IsZero() {
				t.Errorf("json of %s: %+v", b, e)
			}
		case c:
			if e.LastError != "device answered ERROR 7 (parameter 2)" || e.MessageID != "6b080580.00000003" {
				t.Errorf("json of %s: %+v", c, e)
			}
		case z:
			if e.Kind != "relay" || e.Recipient != "carol@example.com" || e.From == nil || *e.From != "" ||
				e.NextAttempt == nil || e.NextAttempt.After(time.Now()) || e.Size != 41 || e.Device != "" {
				t.Errorf("json of %s: %+v", z, e)
			}
		default:
			t.Errorf("json lists %s", e.ID)
		}
	}
	if !strings.Contains(out, `"message_id": "",`) || !strings.Contains(out, `"next_attempt": null`) {
		t.Errorf("json field names:\n%s", out)
	}
}

// testQueueForce: retry --force takes an in-flight delivery back into the
// queue with a warning; its holder's outcome is then refused.
func testQueueForce(t *testing.T, db store.Store, flags []string, b string) {
	code, out, errs := runCmd(t, "", append([]string{"queue", "retry", "--force", b}, flags...)...)
	if code != exitOK || !strings.HasPrefix(out, "retried 1 entry: due now\n") ||
		!strings.Contains(errs, "emsdp: warning: --force took 1 in-flight entry back into the queue: should the server that held it "+
			"still finish it, the device or smarthost gets the message twice") {
		t.Fatalf("retry --force: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errs)
	}
	e, err := db.QueueEntry(context.Background(), store.QueueRef{Kind: store.QueueDelivery, ID: refID(t, b)})
	if err != nil || e.State != "queued" || e.Attempts != 1 || e.NextAttempt.After(time.Now()) || e.Owner != 0 {
		t.Errorf("delivery after retry --force: %+v %v", e, err)
	}
	err = db.FinishDelivery(context.Background(), refID(t, b), store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered})
	if !errors.Is(err, store.ErrConflict) {
		t.Errorf("the holder's outcome after retry --force: %v, want a conflict", err)
	}
}

func refID(t *testing.T, s string) int64 {
	t.Helper()
	var id int64
	if _, err := fmt.Sscanf(s[1:], "%d", &id); err != nil {
		t.Fatal(err)
	}
	return id
}

// queueJSONEntry is what the serve test reads of list --json.
type queueJSONEntry struct {
	ID, State, Device string
	Attempts          int
	MessageID         string `json:"message_id"`
	LastError         string `json:"last_error"`
}

func queueEntries(t *testing.T, args ...string) []queueJSONEntry {
	t.Helper()
	code, out, errs := runCmd(t, "", append([]string{"queue", "list", "--json"}, args...)...)
	if code != exitOK {
		t.Fatalf("queue list: exit %d: %s", code, errs)
	}
	var doc struct{ Entries []queueJSONEntry }
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("queue list --json: %v\n%s", err, out)
	}
	return doc.Entries
}

// With 'emsdp serve' running: a message for a device that does not answer
// is listed as queued with its last error; retry and SIGHUP make the
// server attempt it again at once (its retry schedule says an hour, the
// rescan 30 s); a removed message is never delivered, the one behind it
// is once the device answers.
func TestQueueServe(t *testing.T) {
	serveNoLeaks(t)
	data := filepath.Join(t.TempDir(), "data")
	cfg := serveConfig(t, "")
	text, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	text = []byte(strings.Replace(string(text), `retry = ["100ms"]`, `retry = ["1h"]`, 1))
	if err := os.WriteFile(cfg, text, 0o600); err != nil {
		t.Fatal(err)
	}
	a, errb := startServe(t, "--config", cfg, "--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off", "--data", data)
	// Nothing answers at the device's registered address. (It has a
	// password: a poll from another port redirects its deliveries only
	// when it proves who it is.)
	_, port, _ := strings.Cut(closedUDPAddr(t, "127.0.0.1"), ":")
	for _, args := range [][]string{
		{"device", "add", "--data", data, "--address", "198.036", "--password", "secret", "--ip", "127.0.0.1"},
		{"device", "add", "--data", data, "--address", "198.037", "--password", "pw-037", "--ip", "127.0.0.1", "--port", port},
	} {
		if code, _, errs := runCmd(t, "", args...); code != exitOK {
			t.Fatalf("%v: exit %d: %s", args, code, errs)
		}
	}
	send := func(subject string) {
		t.Helper()
		waitFor(t, "submission of "+subject, func() bool {
			code, _, _ := runCmd(t, subject+"\n", append([]string{"ua", "send", "--server", a.emsd, "--address", "198.036",
				"--password", "secret", "--to", "198.037", "--subject", subject}, strings.Fields(fast)...)...)
			return code == exitOK
		})
	}
	send("one")
	send("two")
	var es []queueJSONEntry
	// The first is attempted and deferred; the device is then held for
	// its retry, the second message with it (not attempted in turn).
	waitFor(t, "the first delivery deferred after an attempt", func() bool {
		es = queueEntries(t, "--data", data)
		return len(es) == 2 && es[0].State == "queued" && es[0].Attempts == 1 && es[0].LastError != "" &&
			es[1].State == "queued" && es[1].Attempts == 0
	})
	one, two := es[0], es[1]
	if one.Device != "198.037" || !regexp.MustCompile(`^[0-9a-f]{8}\.[0-9a-f]{8}$`).MatchString(one.MessageID) {
		t.Errorf("listed %+v", one)
	}
	code, out, _ := runCmd(t, "", "queue", "list", "--data", data)
	if code != exitOK || !regexp.MustCompile(`(?m)^`+one.ID+` +delivery +queued +198\.037 +[0-9a-f]{8}\.[0-9a-f]{8} +\d+ +1 +\S+ +\S+ +\S+ +\S.*$`).MatchString(out) {
		t.Errorf("queue list: exit %d\n%s", code, out)
	}

	if code, out, errs := runCmd(t, "", "queue", "retry", "--data", data, one.ID); code != exitOK || !strings.HasPrefix(out, "retried 1 entry") {
		t.Fatalf("retry: exit %d %q %s", code, out, errs)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a second attempt of the retried delivery", func() bool {
		for _, e := range queueEntries(t, "--data", data, "--state", "all") {
			if e.ID == one.ID {
				return e.Attempts == 2 && e.State == "queued"
			}
		}
		return false
	})

	if code, out, errs := runCmd(t, "", "queue", "remove", "--data", data, one.ID); code != exitOK || out != "removed 1 entry (silently: no report to the sender)\n" {
		t.Fatalf("remove: exit %d %q %s", code, out, errs)
	}
	// The device comes up and polls, from a port of its own (its
	// registered one could be taken by another socket meanwhile): the
	// message behind the removed one is delivered there, the removed one
	// never.
	maildir := filepath.Join(t.TempDir(), "mail")
	uaBackground(t, regexp.MustCompile(`listening on`), append([]string{"ua", "receive", "--listen", "127.0.0.1:0",
		"--maildir", maildir, "--server", a.emsd, "--address", "198.037", "--password", "pw-037", "--domain", "emsd.test", "--poll"},
		strings.Fields(fast)...)...)
	waitFor(t, "the remaining delivery done", func() bool {
		es := queueEntries(t, "--data", data, "--state", "all")
		return len(es) == 1 && es[0].ID == two.ID && es[0].State == "delivered"
	})
	files, _ := filepath.Glob(filepath.Join(maildir, "new", "*"))
	if len(files) != 1 {
		t.Fatalf("%d messages in the Maildir, want 1\n%s", len(files), errb.String())
	}
	msg, err := os.ReadFile(files[0])
	if err != nil || !strings.Contains(string(msg), "Subject: two") {
		t.Errorf("delivered %q %v", msg, err)
	}
}
