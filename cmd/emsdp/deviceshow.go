package main

import (
	"context"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

// deviceLine is the one-line description add and list print.
func deviceLine(d *store.Device) string {
	aliases := strings.Join(d.Aliases, ",")
	if aliases == "" {
		aliases = "-"
	}
	line := fmt.Sprintf("device %s ip=%s port=%s version=%s mode=%s password=%s aliases=%s",
		emsd.Address(d.Address), ipText(d), portText(d), d.Version, d.Mode, yesNo(d.PasswordHash != ""), strings.ToLower(aliases))
	if d.PSK != nil {
		line += " dtls=" + dtlsText(d)
	}
	return line
}

// ipText and portText show the registered address; "-" for none.
func ipText(d *store.Device) string {
	if !d.IP.IsValid() {
		return "-"
	}
	return d.IP.String()
}

func portText(d *store.Device) string {
	if !d.IP.IsValid() {
		return "-"
	}
	return strconv.Itoa(int(d.Port))
}

// ageText is how long ago t was, to the second.
func ageText(now, t time.Time) string {
	return max(now.Sub(t), 0).Round(time.Second).String()
}

// heardText describes a device's contact for show: where it was heard
// from, how long ago, by which server, and whether deliveries go there
// (within lifetime of it, as the server decides; 0: not known).
//
// A device with a DTLS key gets its deliveries through its DTLS sessions,
// which only the server knows, whatever its contact: the text says where
// they go in general.
func heardText(d *store.Device, now time.Time, lifetime time.Duration) string {
	c := d.Contact
	elsewhere := "deliveries go to the registered address"
	if !d.IP.IsValid() {
		elsewhere = "offline: deliveries wait until it is heard again"
	}
	if len(d.PSK) > 0 && lifetime > 0 {
		dtls := "deliveries go over DTLS (on a server with dtls.listen): through the session the device has open with it, else "
		if d.IP.IsValid() {
			dtls += "through one the server opens to the registered address"
		} else {
			dtls += "they wait until it opens one"
		}
		if !c.Known() {
			return "never (no operation with its password yet); " + dtls
		}
		return contactText(c, now) + "; " + dtls
	}
	if !c.Known() {
		if lifetime > 0 {
			return "never (no operation with its password yet); " + elsewhere
		}
		return "never (no operation with its password yet)"
	}
	s := contactText(c, now)
	if lifetime > 0 {
		if now.Sub(c.At) < lifetime {
			s += "; deliveries go there"
		} else {
			s += "; longer ago than delivery.contact_lifetime " + lifetime.String() + ": " + elsewhere
		}
	}
	return s
}

// contactText is where and when a device was heard, and by which server.
func contactText(c store.Contact, now time.Time) string {
	op := "a submission"
	if c.Polled {
		op = "a poll"
	}
	return fmt.Sprintf("%s, %s ago (%s), by %s in %s", c.Addr, ageText(now, c.At), c.At.UTC().Format("2006-01-02 15:04:05Z"), c.Via, op)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func deviceList(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp device list", flag.ContinueOnError)
	var st deviceStore
	st.register(fs)
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	db, err := st.open(ctx, env, open.ReadOnly)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	devs, err := db.Devices(ctx)
	if err != nil {
		return fail(env, err)
	}
	tw := tabwriter.NewWriter(env.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ADDRESS\tIP\tPORT\tVERSION\tMODE\tPASSWORD\tALIASES\tHEARD-FROM\tHEARD-AGO")
	now := time.Now()
	for _, d := range devs {
		aliases := strings.Join(d.Aliases, ",")
		if aliases == "" {
			aliases = "-"
		}
		from, ago := "-", "-"
		if d.Contact.Known() {
			from, ago = d.Contact.Addr.String(), ageText(now, d.Contact.At)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", emsd.Address(d.Address), ipText(d), portText(d), d.Version, d.Mode,
			yesNo(d.PasswordHash != ""), aliases, from, ago)
	}
	tw.Flush()
	return exitOK
}

func deviceShow(ctx context.Context, env *cmdEnv, args []string) int {
	st, a, done, code := addressOnly(flag.NewFlagSet("emsdp device show", flag.ContinueOnError), env, args, nil)
	if done {
		return code
	}
	db, err := st.open(ctx, env, open.ReadOnly)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	d, err := db.Device(ctx, uint32(a))
	if err != nil {
		return storeFail(env, a, err)
	}
	aliases := strings.Join(d.Aliases, ", ")
	if aliases == "" {
		aliases = "-"
	}
	w := env.stdout
	fmt.Fprintf(w, "address:   %s\n", emsd.Address(d.Address))
	fmt.Fprintf(w, "ip:        %s\n", ipText(d))
	fmt.Fprintf(w, "port:      %s\n", portText(d))
	fmt.Fprintf(w, "version:   %s\n", d.Version)
	fmt.Fprintf(w, "mode:      %s\n", d.Mode)
	fmt.Fprintf(w, "password:  %s\n", yesNo(d.PasswordHash != ""))
	if d.PSK != nil {
		fmt.Fprintf(w, "dtls:      %s\n", dtlsText(d))
	}
	fmt.Fprintf(w, "aliases:   %s\n", aliases)
	fmt.Fprintf(w, "control:   %s\n", controlText(d.Control))
	fmt.Fprintf(w, "heard:     %s\n", heardText(d, time.Now(), st.lifetime))
	fmt.Fprintf(w, "created:   %s\n", d.Created.UTC().Format("2006-01-02 15:04:05Z"))
	fmt.Fprintf(w, "updated:   %s\n", d.Updated.UTC().Format("2006-01-02 15:04:05Z"))
	return exitOK
}

// controlText shows the limits the device set with delivery control.
func controlText(c store.DeliveryControl) string {
	var parts []string
	if c.Operations != nil {
		parts = append(parts, fmt.Sprintf("operations=%#x", *c.Operations))
	}
	if c.MaxContentLength != nil {
		parts = append(parts, fmt.Sprintf("max-content-length=%d", *c.MaxContentLength))
	}
	if c.LowestPriority != nil {
		parts = append(parts, fmt.Sprintf("lowest-priority=%d", *c.LowestPriority))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}
