package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"slices"
	"strconv"
	"strings"
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
		fmt.Fprintf(fs.Output(), "usage: emsdp queue %s [--config FILE|--data DIR|--dsn CONNINFO] %s\n", name, synopsis)
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

// queueFail reports a store error: 2 for a value the store refuses, else 1.
func queueFail(env *cmdEnv, err error) int {
	if errors.Is(err, store.ErrInvalid) {
		return fail(env, &usageError{err.Error()})
	}
	return fail(env, err)
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
