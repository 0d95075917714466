package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/mail"
	"strconv"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

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
		kv("message-id", orNone(storedid.Shown(e.MessageID)))
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
		kv("message-id", orNone(storedid.Shown(e.MessageID)))
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
	kv("report-recipient", orNone(storedid.Shown(e.Report.Recipient)))
	kv("report-message-id", orNone(storedid.Shown(e.Report.MessageID)))
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
