package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime"
	"net/mail"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

// cmdQueue: "emsdp queue list|show|retry|remove", the server's delivery
// and relay queues for operators (as mailq and postsuper are for a mail
// server). It works on the store beside running servers, as emsdp device
// does. A server sees removals at once (it claims from the store) and
// takes up what retry made due at its next rescan, within 30 s
// (server.defaultRescan, server.relayIdle), or at once on SIGHUP.
func cmdQueue(ctx context.Context, env *cmdEnv, args []string) int {
	return dispatch(ctx, env, "queue", args,
		subcommand{"list", queueList},
		subcommand{"show", queueShow},
		subcommand{"retry", queueRetry},
		subcommand{"remove", queueRemove},
	)
}

// queueRescan is what retry tells the operator about a running server.
const queueRescan = "a running emsdp serve picks this up within 30 s, or at once on SIGHUP (systemctl reload)"

// queueFlagSet is the flag set of a queue subcommand; its usage shows the
// synopsis and what the ids are.
func queueFlagSet(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet("emsdp queue "+name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: emsdp queue %s [--config FILE|--data DIR|--dsn DSN] %s\n", name, synopsis)
		fmt.Fprintln(fs.Output(), "queue ids are as emsdp queue list prints them: D<number> a delivery, R<number> a relay recipient")
		fs.PrintDefaults()
	}
	return fs
}

// refString is an entry's id as the commands print and take it: D<n> for
// a delivery, R<n> for a relay (the two queues number apart).
func refString(r store.QueueRef) string {
	if r.Kind == store.QueueRelay {
		return "R" + strconv.FormatInt(r.ID, 10)
	}
	return "D" + strconv.FormatInt(r.ID, 10)
}

func parseRef(s string) (store.QueueRef, error) {
	if len(s) >= 2 {
		kind := map[byte]store.QueueKind{'D': store.QueueDelivery, 'd': store.QueueDelivery,
			'R': store.QueueRelay, 'r': store.QueueRelay}[s[0]]
		n, err := strconv.ParseInt(s[1:], 10, 64)
		if kind != "" && err == nil && n > 0 && s[1] != '+' {
			return store.QueueRef{Kind: kind, ID: n}, nil
		}
	}
	return store.QueueRef{}, usagef("queue id %q: want D<number> (a delivery) or R<number> (a relay), as emsdp queue list shows", s)
}

func parseRefs(args []string) ([]store.QueueRef, error) {
	refs := make([]store.QueueRef, 0, len(args))
	for _, a := range args {
		r, err := parseRef(a)
		if err != nil {
			return nil, err
		}
		refs = append(refs, r)
	}
	return refs, nil
}

// deviceFlag parses --device NNN.NNN.
func deviceFlag(s string) (uint32, error) {
	a, err := emsd.ParseAddress(s)
	if err != nil || a == 0 {
		return 0, usagef("--device %q: want an EMSD address NNN.NNN other than 0", s)
	}
	return uint32(a), nil
}

// queueStates are the names --state takes and the stored states they
// select. A relay's "sending" is a delivery's "inflight" (a server has it
// now), its "sent" a delivery's "delivered": either name selects both.
var queueStates = map[string][]string{
	"queued":    {"queued"},
	"inflight":  {"inflight", "sending"},
	"sending":   {"inflight", "sending"},
	"delivered": {"delivered", "sent"},
	"sent":      {"delivered", "sent"},
	"failed":    {"failed"},
	"active":    {"queued", "inflight", "sending"},
	"all":       nil,
}

// stateOrder is the order of the states in the summary line.
var stateOrder = []string{"queued", "inflight", "sending", "delivered", "sent", "failed"}

func parseStates(s string) ([]string, error) {
	var out []string
	for _, name := range strings.Split(s, ",") {
		name = strings.ToLower(strings.TrimSpace(name))
		states, ok := queueStates[name]
		if !ok {
			return nil, usagef("--state %q: want queued, inflight, delivered, failed, active or all (comma-separated)", name)
		}
		if name == "all" {
			return nil, nil
		}
		for _, st := range states {
			if !slices.Contains(out, st) {
				out = append(out, st)
			}
		}
	}
	return out, nil
}

// queueTime prints a time as RFC 3339 in UTC, to the second; "-" for none.
func queueTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

// field makes a value one whitespace-free column: "-" for nothing, quoted
// when it holds spaces or control characters (an odd Message-ID or address).
func field(s string) string {
	if s == "" {
		return "-"
	}
	if strings.IndexFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '"' }) >= 0 {
		return strconv.Quote(s)
	}
	return s
}

// lastErrorWidth is where list cuts the last error (show has all of it).
const lastErrorWidth = 60

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func clipError(s string) string {
	s = oneLine(s)
	if r := []rune(s); len(r) > lastErrorWidth {
		return string(r[:lastErrorWidth-3]) + "..."
	}
	if s == "" {
		return "-"
	}
	return s
}

// entryTo is the recipient column: the device or the Internet address.
func entryTo(e *store.QueueEntry) string {
	if e.Ref.Kind == store.QueueDelivery {
		return emsd.Address(e.Device).String()
	}
	return e.Recipient
}

// nextAttempt is shown while an entry waits for one.
func nextAttempt(e *store.QueueEntry) time.Time {
	if e.State != string(store.DeliveryQueued) {
		return time.Time{}
	}
	return e.NextAttempt
}

func queueList(ctx context.Context, env *cmdEnv, args []string) int {
	fs := queueFlagSet("list", "[--deliveries|--relays] [--state S,...] [--device NNN.NNN] [--limit N] [--json]")
	var st deviceStore
	st.register(fs)
	deliveries := fs.Bool("deliveries", false, "list deliveries to devices only")
	relays := fs.Bool("relays", false, "list relays to Internet recipients only")
	state := fs.String("state", "active", "states to list, comma-separated: queued, inflight (sending), delivered (sent), failed; active = queued and inflight; all")
	device := fs.String("device", "", "list the deliveries to this device NNN.NNN only")
	limit := fs.Int("limit", store.DefaultQueueLimit, "list at most this many entries (the summary counts all)")
	asJSON := fs.Bool("json", false, "print one JSON document for scripts")
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	f := store.QueueFilter{Limit: *limit}
	switch {
	case *deliveries && *relays:
		return fail(env, usagef("--deliveries and --relays exclude each other (give neither for both)"))
	case *deliveries:
		f.Kind = store.QueueDelivery
	case *relays:
		f.Kind = store.QueueRelay
	}
	if *limit < 1 {
		return fail(env, usagef("--limit %d: want 1 or more", *limit))
	}
	var err error
	if f.States, err = parseStates(*state); err != nil {
		return fail(env, err)
	}
	if *device != "" {
		if *relays {
			return fail(env, usagef("--device selects deliveries to a device; relays go to Internet recipients"))
		}
		if f.Device, err = deviceFlag(*device); err != nil {
			return fail(env, err)
		}
	}
	db, err := st.open(ctx, env, open.ReadOnly)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	l, err := db.ListQueue(ctx, f)
	if err != nil {
		return queueFail(env, err)
	}
	if *asJSON {
		return printQueueJSON(env, l)
	}
	tw := tabwriter.NewWriter(env.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tKIND\tSTATE\tTO\tMESSAGE-ID\tSIZE\tATTEMPTS\tQUEUED\tNEXT-ATTEMPT\tEXPIRES\tLAST-ERROR")
	for i := range l.Entries {
		e := &l.Entries[i]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", refString(e.Ref), e.Ref.Kind, e.State,
			field(entryTo(e)), field(shownID(e.MessageID)), e.Size, e.Attempts, queueTime(e.Created), queueTime(nextAttempt(e)),
			queueTime(e.Expires), clipError(e.LastError))
	}
	tw.Flush()
	fmt.Fprintln(env.stdout, queueSummary(l))
	if f.Device != 0 {
		fmt.Fprintf(env.stdout, "-- device %s heard: %s\n", emsd.Address(f.Device), deviceHeard(ctx, db, f.Device, st.lifetime))
	}
	if l.Truncated() {
		fmt.Fprintf(env.stdout, "-- listing cut at %d of %d entries (--limit)\n", len(l.Entries), l.Matched())
	}
	return exitOK
}

// queueSummary is list's last line: the entries matching, by queue and
// state, e.g. "-- 3 entries: delivery queued=1 inflight=1, relay queued=1".
func queueSummary(l store.QueueList) string {
	n := l.Matched()
	s := fmt.Sprintf("-- %d %s", n, plural(n, "entry", "entries"))
	var kinds []string
	for _, k := range []store.QueueKind{store.QueueDelivery, store.QueueRelay} {
		var parts []string
		for _, st := range stateOrder {
			if c := l.Counts[k][st]; c > 0 {
				parts = append(parts, fmt.Sprintf("%s=%d", st, c))
			}
		}
		var other []string // states this program does not know, sorted
		for st, c := range l.Counts[k] {
			if !slices.Contains(stateOrder, st) && c > 0 {
				other = append(other, fmt.Sprintf("%s=%d", st, c))
			}
		}
		slices.Sort(other)
		parts = append(parts, other...)
		if len(parts) > 0 {
			kinds = append(kinds, string(k)+" "+strings.Join(parts, " "))
		}
	}
	if len(kinds) > 0 {
		s += ": " + strings.Join(kinds, ", ")
	}
	return s
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// queueEntryJSON is one entry of list --json; the fields are documented in
// the README and stay as they are.
type queueEntryJSON struct {
	ID          string     `json:"id"`
	Kind        string     `json:"kind"`
	State       string     `json:"state"`
	Device      string     `json:"device,omitempty"`    // delivery
	Recipient   string     `json:"recipient,omitempty"` // relay
	From        *string    `json:"from,omitempty"`      // relay: envelope sender, "" = null sender
	MessageID   string     `json:"message_id"`
	Size        int        `json:"size"`
	Attempts    int        `json:"attempts"`
	QueuedAt    time.Time  `json:"queued_at"`
	NextAttempt *time.Time `json:"next_attempt"` // null unless queued
	Expires     time.Time  `json:"expires"`
	LastError   string     `json:"last_error"`
	Node        int32      `json:"node,omitempty"` // PostgreSQL: the server node that has it in flight
}

type queueListJSON struct {
	Entries   []queueEntryJSON          `json:"entries"`
	Counts    map[string]map[string]int `json:"counts"`
	Matched   int                       `json:"matched"`
	Truncated bool                      `json:"truncated"`
}

func printQueueJSON(env *cmdEnv, l store.QueueList) int {
	out := queueListJSON{Entries: []queueEntryJSON{}, Counts: map[string]map[string]int{}, Matched: l.Matched(),
		Truncated: l.Truncated()}
	for k, byState := range l.Counts {
		out.Counts[string(k)] = byState
	}
	for i := range l.Entries {
		e := &l.Entries[i]
		j := queueEntryJSON{ID: refString(e.Ref), Kind: string(e.Ref.Kind), State: e.State, MessageID: shownID(e.MessageID),
			Size: e.Size, Attempts: e.Attempts, QueuedAt: e.Created.UTC(), Expires: e.Expires.UTC(),
			LastError: e.LastError, Node: e.Owner}
		if e.Ref.Kind == store.QueueDelivery {
			j.Device = emsd.Address(e.Device).String()
		} else {
			j.Recipient, j.From = e.Recipient, &e.From
		}
		if t := nextAttempt(e); !t.IsZero() {
			t = t.UTC()
			j.NextAttempt = &t
		}
		out.Entries = append(out.Entries, j)
	}
	enc := json.NewEncoder(env.stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return fail(env, err)
	}
	return exitOK
}

// queueFail reports a store error: 2 for a value the store refuses, else 1.
func queueFail(env *cmdEnv, err error) int {
	if errors.Is(err, store.ErrInvalid) {
		return fail(env, &usageError{err.Error()})
	}
	return fail(env, err)
}

func queueShow(ctx context.Context, env *cmdEnv, args []string) int {
	fs := queueFlagSet("show", "ID")
	var st deviceStore
	st.register(fs)
	pos, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	if len(pos) != 1 {
		return fail(env, usagef("give one queue id (D<number> or R<number>)"))
	}
	ref, err := parseRef(pos[0])
	if err != nil {
		return fail(env, err)
	}
	db, err := st.open(ctx, env, open.ReadOnly)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	e, err := db.QueueEntry(ctx, ref)
	if errors.Is(err, store.ErrNotFound) {
		return fail(env, fmt.Errorf("no queue entry %s", refString(ref)))
	}
	if err != nil {
		return queueFail(env, err)
	}
	printEntry(env.stdout, e)
	if e.Ref.Kind == store.QueueDelivery {
		fmt.Fprintf(env.stdout, "%-18s %s\n", "device-heard:", deviceHeard(ctx, db, e.Device, st.lifetime))
	}
	return exitOK
}

// deviceHeard is where deliveries to a device go now, for queue show and
// list --device: the device's contact and its age (heardText).
func deviceHeard(ctx context.Context, db store.Registry, addr uint32, lifetime time.Duration) string {
	d, err := db.Device(ctx, addr)
	if errors.Is(err, store.ErrNotFound) {
		return "- (the device is no longer registered)"
	}
	if err != nil {
		return "- (" + err.Error() + ")"
	}
	return heardText(d, time.Now(), lifetime)
}

// printEntry prints every stored field of e but its contents, of which it
// shows the length and a few heading fields.
func printEntry(w io.Writer, e *store.QueueEntry) {
	kv := func(k, v string) { fmt.Fprintf(w, "%-18s %s\n", k+":", v) }
	orNone := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	kv("id", refString(e.Ref))
	kv("kind", string(e.Ref.Kind))
	kv("state", e.State)
	if e.Ref.Kind == store.QueueDelivery {
		kv("device", emsd.Address(e.Device).String())
		kv("message-id", orNone(shownID(e.MessageID)))
		kv("content-type", fmt.Sprintf("%d (%s)", e.ContentType, emsd.ContentType(e.ContentType)))
		kv("priority", fmt.Sprintf("%d (%s)", e.Priority, map[uint8]string{0: "non-urgent", 1: "normal", 2: "urgent"}[e.Priority]))
		if e.SubmissionTime != nil {
			kv("submission-time", queueTime(emsd.Time(*e.SubmissionTime).UTC()))
		} else {
			kv("submission-time", "-")
		}
	} else {
		kv("recipient", e.Recipient)
		if e.From == "" {
			kv("envelope-from", "<> (null sender: a report)")
		} else {
			kv("envelope-from", e.From)
		}
		kv("message-ref", fmt.Sprintf("%d (shared by the message's recipients)", e.MessageRef))
		kv("message-id", orNone(shownID(e.MessageID)))
	}
	kv("size", fmt.Sprintf("%d octets", e.Size))
	kv("attempts", strconv.Itoa(e.Attempts))
	kv("queued", queueTime(e.Created))
	kv("updated", queueTime(e.Updated))
	kv("next-attempt", queueTime(nextAttempt(e)))
	kv("expires", queueTime(e.Expires))
	kv("last-error", orNone(oneLine(e.LastError)))
	if e.Owner != 0 {
		kv("node", fmt.Sprintf("%d (the server that has it in flight; PostgreSQL application_name \"emsdp node %d\")", e.Owner, e.Owner))
	}
	var to []string
	if e.Report.Device != 0 {
		to = append(to, "device "+emsd.Address(e.Report.Device).String())
	}
	if e.Report.Mail != "" {
		to = append(to, "mail "+e.Report.Mail)
	}
	if len(to) == 0 {
		to = []string{"-"}
	}
	kv("report-to", strings.Join(to, ", "))
	kv("report-flags", fmt.Sprintf("0x%02x", e.Report.Flags))
	kv("report-recipient", orNone(shownID(e.Report.Recipient)))
	kv("report-message-id", orNone(shownID(e.Report.MessageID)))
	if len(e.Report.Headers) > 0 {
		kv("report-headers", fmt.Sprintf("%d octets", len(e.Report.Headers)))
	} else {
		kv("report-headers", "-")
	}
	for _, h := range contentSummary(e) {
		kv(h[0], h[1])
	}
}

// contentSummary is a few heading fields of the contents, when they decode
// cheaply: an IPM's subject and originator, an RFC 5322 message's
// Message-ID, From and Subject.
func contentSummary(e *store.QueueEntry) [][2]string {
	if e.Ref.Kind == store.QueueDelivery {
		if emsd.ContentType(e.ContentType) != emsd.ContentIPM {
			return nil
		}
		var ipm emsd.IPM
		if err := ipm.Unmarshal(e.Content, emsd.Options{}); err != nil { // stored in protocol 1.1
			return [][2]string{{"content", "not a decodable IPM: " + err.Error()}}
		}
		return [][2]string{{"subject", strconv.Quote(ipm.Heading.Subject)}, {"from", ipm.Heading.Originator.String()}}
	}
	m, err := mail.ReadMessage(bytes.NewReader(e.Content))
	if err != nil {
		return [][2]string{{"content", "no RFC 5322 header: " + err.Error()}}
	}
	var dec mime.WordDecoder
	var out [][2]string
	for _, h := range []string{"Message-ID", "From", "Subject"} {
		v := m.Header.Get(h)
		if d, err := dec.DecodeHeader(v); err == nil {
			v = d
		}
		switch {
		case h == "Subject":
			v = strconv.Quote(v)
		case oneLine(v) == "":
			v = "-"
		default:
			v = oneLine(v)
		}
		out = append(out, [2]string{"header-" + strings.ToLower(h), v})
	}
	return out
}

func queueRetry(ctx context.Context, env *cmdEnv, args []string) int {
	fs := queueFlagSet("retry", "[--force] ID ...|--all|--device NNN.NNN")
	var st deviceStore
	st.register(fs)
	all := fs.Bool("all", false, "retry every queued entry")
	device := fs.String("device", "", "retry the queued deliveries to this device NNN.NNN")
	force := fs.Bool("force", false, "also take the selected entries in flight back into the queue, whichever server holds them; "+
		"only when that server is gone or stuck: if it finishes them after all, the message goes out twice")
	pos, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	var sel store.QueueSelect
	var err error
	if sel.Refs, err = parseRefs(pos); err != nil {
		return fail(env, err)
	}
	sel.All, sel.Force = *all, *force
	if *device != "" {
		if sel.Device, err = deviceFlag(*device); err != nil {
			return fail(env, err)
		}
	}
	if _, err := store.CheckQueueSelect(sel); err != nil {
		return fail(env, usagef("give queue ids (D<number>, R<number>), --all or --device NNN.NNN: one of them"))
	}
	db, err := st.open(ctx, env, open.Existing)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	ch, err := db.RetryQueued(ctx, sel, time.Now())
	if err != nil {
		return queueFail(env, err)
	}
	fmt.Fprintf(env.stdout, "retried %d %s: due now\n", ch.Changed, plural(ch.Changed, "entry", "entries"))
	if ch.Forced > 0 {
		fmt.Fprintf(env.stderr, "emsdp: warning: --force took %d in-flight %s back into the queue: should the server that held %s "+
			"still finish %s, the device or smarthost gets the message twice (a receiver drops the copy by its message id; "+
			"emsdp ua does)\n", ch.Forced, plural(ch.Forced, "entry", "entries"), plural(ch.Forced, "it", "them"), plural(ch.Forced, "it", "them"))
	}
	code = exitOK
	for _, sk := range ch.Skipped {
		id := refString(sk.Ref)
		switch sk.State {
		case "":
			fmt.Fprintf(env.stderr, "emsdp: no queue entry %s\n", id)
			code = exitFailed
		case store.InFlightState(sk.Ref.Kind):
			fmt.Fprintf(env.stdout, "%s is in flight (a server is attempting it now): left alone (--force takes it back)\n", id)
		default:
			fmt.Fprintf(env.stderr, "emsdp: %s is %s: not retried (finished entries stay finished)\n", id, sk.State)
			code = exitFailed
		}
	}
	if len(sel.Refs) == 0 && ch.InFlight > 0 {
		fmt.Fprintf(env.stdout, "%d in flight (a server is attempting them now): left alone (--force takes them back)\n", ch.InFlight)
	}
	if ch.Changed > 0 {
		fmt.Fprintln(env.stdout, "note: "+queueRescan)
	}
	return code
}

func queueRemove(ctx context.Context, env *cmdEnv, args []string) int {
	fs := queueFlagSet("remove", "ID ...")
	var st deviceStore
	st.register(fs)
	pos, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	if len(pos) == 0 {
		return fail(env, usagef("give the ids of the entries to remove (D<number>, R<number>)"))
	}
	refs, err := parseRefs(pos)
	if err != nil {
		return fail(env, err)
	}
	db, err := st.open(ctx, env, open.Existing)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	ch, err := db.RemoveQueued(ctx, refs)
	if err != nil {
		return queueFail(env, err)
	}
	fmt.Fprintf(env.stdout, "removed %d %s (silently: no report to the sender)\n", ch.Changed, plural(ch.Changed, "entry", "entries"))
	code = exitOK
	for _, sk := range ch.Skipped {
		id := refString(sk.Ref)
		switch sk.State {
		case "":
			fmt.Fprintf(env.stderr, "emsdp: no queue entry %s\n", id)
		case store.InFlightState(sk.Ref.Kind):
			fmt.Fprintf(env.stderr, "emsdp: %s is in flight (a server is attempting it now): not removed; "+
				"remove it once it is back in the queue\n", id)
		default:
			fmt.Fprintf(env.stderr, "emsdp: %s is %s: not removed (only queued entries can be)\n", id, sk.State)
		}
		code = exitFailed
	}
	return code
}

// shownID is a stored id or report recipient as the rest of the CLI, the
// devices and the logs show it: "L:6b17127c.00000003" is
// 6b17127c.00000003, "L:198037" the device 198.037, "R:<a@b>" <a@b>.
func shownID(stored string) string {
	switch {
	case strings.HasPrefix(stored, "L:"):
		v := stored[2:]
		if !strings.Contains(v, ".") {
			if n, err := strconv.ParseUint(v, 10, 32); err == nil {
				return emsd.Address(n).String()
			}
		}
		return v
	case strings.HasPrefix(stored, "R:"):
		return stored[2:]
	}
	return stored
}
