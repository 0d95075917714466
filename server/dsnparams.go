package server

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/gateway"
)

// dsnParams are an Internet sender's RFC 3461 parameters for one
// recipient, kept with its queue entry (store.Report.DSN) until a DSN is
// due.
type dsnParams struct {
	notify []string // NOTIFY values, upper case; nil = not given
	orcpt  string   // ORCPT as "type;address"
	envID  string   // ENVID
	ret    string   // RET: FULL or HDRS
	// arrival is when the message arrived, for Arrival-Date (kept even
	// when the sender gave no parameters).
	arrival time.Time
}

// dsnParamsFor picks recipient rcpt's parameters out of env, for a
// message that arrived at arrival.
func dsnParamsFor(env *gateway.Envelope, rcpt string, arrival time.Time) dsnParams {
	p := dsnParams{envID: env.EnvID, ret: string(env.Ret), arrival: arrival}
	if i := slices.Index(env.To, rcpt); i >= 0 && i < len(env.Rcpts) {
		r := env.Rcpts[i]
		p.orcpt = r.ORCPT
		for _, n := range r.Notify {
			p.notify = append(p.notify, strings.ToUpper(string(n)))
		}
	}
	return p
}

// encode is the stored form: a URL query, "" when nothing was given.
func (p dsnParams) encode() string {
	v := url.Values{}
	if p.notify != nil {
		v.Set("notify", strings.Join(p.notify, ","))
	}
	for k, s := range map[string]string{"orcpt": p.orcpt, "envid": p.envID, "ret": p.ret} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if !p.arrival.IsZero() {
		v.Set("arrival", strconv.FormatInt(p.arrival.Unix(), 10))
	}
	return v.Encode()
}

// parseDSNParams reads encode's form; anything unreadable is no
// parameters (the default behaviour: failures are reported).
func parseDSNParams(s string) dsnParams {
	v, err := url.ParseQuery(s)
	if err != nil || s == "" {
		return dsnParams{}
	}
	p := dsnParams{orcpt: v.Get("orcpt"), envID: v.Get("envid"), ret: v.Get("ret")}
	if sec, err := strconv.ParseInt(v.Get("arrival"), 10, 64); err == nil && sec > 0 {
		p.arrival = time.Unix(sec, 0).UTC()
	}
	if v.Has("notify") {
		p.notify = strings.Split(v.Get("notify"), ",")
	}
	return p
}

// wants says whether the sender is to get a DSN for this outcome (RFC 3461
// §4.1): without NOTIFY, failures only (and successes the EMSD flags ask
// for); NOTIFY=NEVER none; otherwise what it lists. Delays are not
// reported.
func (p dsnParams) wants(delivered, flagsAsk bool) bool {
	if p.notify == nil {
		return !delivered || flagsAsk
	}
	want := string(smtp.DSNNotifyFailure)
	if delivered {
		want = string(smtp.DSNNotifySuccess)
	}
	return slices.Contains(p.notify, want)
}

// never: NOTIFY=NEVER.
func (p dsnParams) never() bool { return slices.Contains(p.notify, string(smtp.DSNNotifyNever)) }
