package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/mail"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/server"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

// cmdDevice: "emsdp device add|list|show|remove|passwd|psk|import|export", the device
// registry of the server's store. It works beside running servers (SQLite
// in WAL mode, or the PostgreSQL database they share), which notice the
// change within store.registry_poll or at SIGHUP.
func cmdDevice(ctx context.Context, env *cmdEnv, args []string) int {
	return dispatch(ctx, env, "device", args,
		subcommand{"add", deviceAdd},
		subcommand{"list", deviceList},
		subcommand{"show", deviceShow},
		subcommand{"remove", deviceRemove},
		subcommand{"passwd", devicePasswd},
		subcommand{"psk", devicePSK},
		subcommand{"import", deviceImport},
		subcommand{"export", deviceExport},
	)
}

// deviceStore holds the flags that locate the store: those of emsdp
// serve, so that a command line names the same store for both.
type deviceStore struct {
	data, conninfo, config string
	// lifetime is the servers' delivery.contact_lifetime, set by open.
	lifetime time.Duration
}

func (d *deviceStore) register(fs *flag.FlagSet) {
	fs.StringVar(&d.data, "data", "", "data directory of the server's SQLite store (default: as --config says, else ./emsdp-data)")
	fs.StringVar(&d.conninfo, "dsn", "", "PostgreSQL store of the servers (default: as --config says)")
	fs.StringVar(&d.config, "config", "", "the server's configuration file, to find its store")
}

// open opens the store the server of --config uses, or the one --data or
// --dsn names instead, as a says: only an existing store unless a is
// open.Create (which says so when it creates one). From then on
// every error fail prints names the store.
func (d *deviceStore) open(ctx context.Context, env *cmdEnv, a open.Access) (store.Store, error) {
	if d.data != "" && d.conninfo != "" {
		return nil, usagef("--data (SQLite) and --dsn (PostgreSQL) name two stores: give one")
	}
	cfg, err := server.LoadConfig(d.config)
	if err != nil {
		return nil, err
	}
	from := "the default data directory " + cfg.Data
	if d.config != "" {
		from = "data of " + d.config
	}
	switch {
	case d.conninfo != "":
		cfg.Store.Driver, cfg.Store.Conninfo, cfg.Store.BusyTimeout = server.StorePostgres, d.conninfo, 0
		from = "--dsn"
	case d.data != "":
		if cfg.Store.Driver != server.StoreSQLite {
			// A new empty SQLite store would be created beside the real one.
			return nil, usagef("--data names a SQLite store, but the store of %s is %s", d.config, cfg.Store.Driver)
		}
		cfg.Data = d.data
		from = "--data " + d.data
	case cfg.Store.Driver == server.StorePostgres:
		from = "store.dsn of " + d.config
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d.lifetime = time.Duration(cfg.Delivery.ContactLifetime)
	sc := cfg.StoreConfig()
	sc.Access = a
	where := sc.Location()
	created := false
	if sc.Driver == open.SQLite && a == open.Create {
		_, err := os.Stat(where)
		created = errors.Is(err, os.ErrNotExist)
	}
	db, err := open.Open(ctx, sc)
	if errors.Is(err, open.ErrNoStore) {
		return nil, fmt.Errorf("no store at %s (from %s): a server keeps its store there once started with the same --data "+
			"or --config; give the ones emsdp serve runs with (a new store is made only by emsdp device add)", where, from)
	}
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", where, err)
	}
	env.store = where
	if created {
		fmt.Fprintf(env.stderr, "emsdp: note: created a new, empty store at %s (from %s); a server uses it only when "+
			"started with the same --data or --config\n", where, from)
	}
	return db, nil
}

// aliasList is the repeatable --alias flag; commas separate addresses too.
type aliasList []string

func (l *aliasList) String() string { return strings.Join(*l, ",") }

func (l *aliasList) Set(s string) error {
	for _, a := range strings.Split(s, ",") {
		if a = strings.TrimSpace(a); a != "" {
			*l = append(*l, a)
		}
	}
	return nil
}

// addressFlag parses --address NNN.NNN; 0 is not a device.
func addressFlag(s string) (emsd.Address, error) {
	if s == "" {
		return 0, usagef("--address NNN.NNN is required")
	}
	a, err := emsd.ParseAddress(s)
	if err != nil || a == 0 {
		return 0, usagef("--address %q: want an EMSD address NNN.NNN other than 0", s)
	}
	return a, nil
}

func passwordFlag(pw string) (string, error) {
	if len(pw) > store.MaxPassword {
		return "", usagef("--password is %d octets, at most %d", len(pw), store.MaxPassword)
	}
	return store.HashPassword(pw)
}

// storeFail reports a store error: 1, or 2 for a value the store refuses.
func storeFail(env *cmdEnv, a emsd.Address, err error) int {
	switch {
	case errors.Is(err, store.ErrInvalid):
		return fail(env, &usageError{err.Error()})
	case errors.Is(err, store.ErrNotFound):
		return fail(env, fmt.Errorf("no device %s", a))
	}
	return fail(env, err)
}

func deviceAdd(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp device add", flag.ContinueOnError)
	var st deviceStore
	st.register(fs)
	address := fs.String("address", "", "EMSD address NNN.NNN (required)")
	password := fs.String("password", "", `device password, at most 16 octets (required; "" for none)`)
	ip := fs.String("ip", "", "the device's registered IP address: a device without password is known by it, and deliveries go there "+
		"while the device has not been heard lately from elsewhere; optional for a device with a password (behind a NAT, on changing addresses)")
	port := fs.Int("port", emsd.DefaultPort, "the device's registered UDP port (with --ip)")
	version := fs.String("version", "1.1", "EMSD protocol version of the device: 1.1 or 1.0")
	mode := fs.String("mode", "complete", "delivery mode: complete (3-way) or efficient (2-way)")
	var aliases aliasList
	fs.Var(&aliases, "alias", "mail address delivered to this device (repeatable, comma-separated)")
	psk := fs.String("psk", "", `DTLS pre-shared key: "generate" (printed once) or 32..128 hex digits; the identity is the address`)
	requireDTLS := fs.Bool("require-dtls", false, "refuse the device's operations over plain UDP (needs --psk)")
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *ip == "" && set["port"] {
		return fail(env, usagef("--port needs --ip"))
	}
	d, err := deviceFromFlags(*address, *ip, *port, *version, *mode, aliases)
	if err != nil {
		return fail(env, err)
	}
	if !set["password"] && *psk == "" {
		return fail(env, usagef(`--password is required (--password "" for a device without one), unless --psk is given`))
	}
	var generated bool
	if d.PSK, generated, err = pskFlag(*psk); err != nil {
		return fail(env, err)
	}
	d.RequireDTLS = *requireDTLS
	if d.RequireDTLS && d.PSK == nil {
		return fail(env, usagef("--require-dtls needs --psk"))
	}
	if *ip == "" && *password == "" && *psk == "" {
		return fail(env, usagef("--ip is required for a device without password or DTLS key: nothing else could tell it apart "+
			"(with a password it may be left out: the server delivers where it hears the device from)"))
	}
	if d.PasswordHash, err = passwordFlag(*password); err != nil {
		return fail(env, err)
	}
	db, err := st.open(ctx, env, open.Create)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	if err := db.AddDevice(ctx, d); err != nil {
		if errors.Is(err, store.ErrExists) {
			return fail(env, fmt.Errorf("device %s not added: %w", emsd.Address(d.Address), err))
		}
		return storeFail(env, emsd.Address(d.Address), err)
	}
	fmt.Fprintf(env.stdout, "added %s\n", deviceLine(d))
	if generated {
		printPSK(env, d)
	}
	return exitOK
}

func deviceFromFlags(address, ip string, port int, version, mode string, aliases []string) (*store.Device, error) {
	a, err := addressFlag(address)
	if err != nil {
		return nil, err
	}
	var addr netip.Addr
	if ip != "" {
		if addr, err = netip.ParseAddr(ip); err != nil {
			return nil, usagef("--ip %q: %v", ip, err)
		}
		if port < 1 || port > 65535 {
			return nil, usagef("--port %d out of range 1..65535", port)
		}
	} else {
		port = 0
	}
	v, err := emsd.ParseVersion(version)
	if err != nil || (v != emsd.V1_1 && v != emsd.V1_0) {
		return nil, usagef("--version %q: want 1.1 or 1.0", version)
	}
	m := store.Mode(strings.ToLower(mode))
	if m != store.ModeComplete && m != store.ModeEfficient {
		return nil, usagef("--mode %q: want complete or efficient", mode)
	}
	for _, al := range aliases {
		pa, err := mail.ParseAddress(al)
		if err != nil || pa.Name != "" || !strings.Contains(pa.Address, "@") {
			return nil, usagef("--alias %q: want a mail address such as alice@example.net", al)
		}
	}
	return &store.Device{Address: uint32(a), IP: addr.Unmap(), Port: uint16(port), Version: v.String(), Mode: m,
		Aliases: aliases}, nil
}

// addressOnly parses the commands that name one device: --address NNN.NNN
// or the address as the only argument (anywhere among the flags).
func addressOnly(fs *flag.FlagSet, env *cmdEnv, args []string, more func(*flag.FlagSet)) (*deviceStore, emsd.Address, bool, int) {
	var st deviceStore
	st.register(fs)
	address := fs.String("address", "", "EMSD address NNN.NNN")
	if more != nil {
		more(fs)
	}
	pos, done, code := parseFlags(fs, env, args, 1)
	if done {
		return nil, 0, true, code
	}
	if len(pos) == 1 {
		if *address != "" {
			fmt.Fprintf(env.stderr, "%s: give the address once\n", fs.Name())
			return nil, 0, true, exitUsage
		}
		*address = pos[0]
	}
	a, err := addressFlag(*address)
	if err != nil {
		return nil, 0, true, fail(env, err)
	}
	return &st, a, false, 0
}

func deviceRemove(ctx context.Context, env *cmdEnv, args []string) int {
	st, a, done, code := addressOnly(flag.NewFlagSet("emsdp device remove", flag.ContinueOnError), env, args, nil)
	if done {
		return code
	}
	db, err := st.open(ctx, env, open.Existing)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	if err := db.RemoveDevice(ctx, uint32(a)); err != nil {
		return storeFail(env, a, err)
	}
	fmt.Fprintf(env.stdout, "removed device %s\n", a)
	return exitOK
}

// editDevice reads device a, lets edit change it and writes it back, in
// the store the flags name. A failure is reported, and its exit code
// returned; an error from edit is the user's (a usage error, say).
func (st *deviceStore) editDevice(ctx context.Context, env *cmdEnv, a emsd.Address, edit func(*store.Device) error) (*store.Device, int) {
	db, err := st.open(ctx, env, open.Existing)
	if err != nil {
		return nil, fail(env, err)
	}
	defer db.Close()
	d, err := db.Device(ctx, uint32(a))
	if err != nil {
		return nil, storeFail(env, a, err)
	}
	if err := edit(d); err != nil {
		return nil, fail(env, err)
	}
	if err := db.UpdateDevice(ctx, d); err != nil {
		return nil, storeFail(env, a, err)
	}
	return d, exitOK
}

func devicePasswd(ctx context.Context, env *cmdEnv, args []string) int {
	var password *string
	fs := flag.NewFlagSet("emsdp device passwd", flag.ContinueOnError)
	st, a, done, code := addressOnly(fs, env, args, func(fs *flag.FlagSet) {
		password = fs.String("password", "", `new password, at most 16 octets (required; "" removes it)`)
	})
	if done {
		return code
	}
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == "password" })
	if !set {
		return fail(env, usagef(`--password is required (--password "" removes the password)`))
	}
	hash, err := passwordFlag(*password)
	if err != nil {
		return fail(env, err)
	}
	if _, code := st.editDevice(ctx, env, a, func(d *store.Device) error {
		d.PasswordHash = hash
		return nil
	}); code != exitOK {
		return code
	}
	if hash == "" {
		fmt.Fprintf(env.stdout, "password removed for device %s\n", a)
	} else {
		fmt.Fprintf(env.stdout, "password changed for device %s\n", a)
	}
	return exitOK
}
