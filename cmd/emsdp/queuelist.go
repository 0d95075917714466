package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

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
			field(entryTo(e)), field(storedid.Shown(e.MessageID)), e.Size, e.Attempts, queueTime(e.Created), queueTime(nextAttempt(e)),
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
		j := queueEntryJSON{ID: refString(e.Ref), Kind: string(e.Ref.Kind), State: e.State, MessageID: storedid.Shown(e.MessageID),
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
