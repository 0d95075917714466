package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/esro-emsdp/emsdp/server"
)

// cmdServe: "emsdp serve", the EMSD server (package server). It runs until
// SIGINT or SIGTERM (then drains and exits 0). SIGHUP reloads the device
// registry and the SMTP TLS certificate, looks at the queues at once
// (emsdp queue retry) and, with --config, re-reads the file with the same
// flags on top and applies what can change while running
// (server.Reconfigure); an invalid file is logged and changes nothing.
func cmdServe(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp serve", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "TOML configuration file (default: the embedded defaults); re-read on SIGHUP")
	listen := fs.String("listen", "", "UDP address of the EMSD service (default :641)")
	dtlsAddr := fs.String("dtls-listen", "", `UDP address of EMSD over DTLS with per-device keys (default off; the documented port is 4641; "off" disables)`)
	smtpAddr := fs.String("smtp", "", `inbound SMTP address (default 127.0.0.1:2525; "off" disables)`)
	admin := fs.String("admin", "", `admin HTTP address for /metrics, /healthz, /debug/pprof (default 127.0.0.1:9641; "off" disables)`)
	pprofOn := fs.Bool("pprof", true, "serve /debug/pprof on the admin listener (admin.pprof); -pprof=false keeps /metrics and /healthz only")
	data := fs.String("data", "", "data directory holding the SQLite store (default ./emsdp-data)")
	conninfo := fs.String("dsn", "", "PostgreSQL store shared by several servers (sets store.driver = \"postgres\"; see store.dsn)")
	domain := fs.String("domain", "", "mail domain of the devices, NNN.NNN@domain (default: the host name)")
	smarthost := fs.String("smarthost", "", "HOST:PORT of the SMTP relay for Internet mail (default none: such mail stays queued)")
	logLevel := fs.String("log-level", "", "trace (every PDU, decoded), debug, info, warn or error (default info)")
	trace := fs.Bool("trace", false, "log every PDU in and out, decoded, passwords masked (--log-level trace)")
	logFormat := fs.String("log-format", "", `log lines as "text" or "json" (default text)`)
	check := fs.Bool("check-config", false, "validate the configuration, print it and exit")
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	off := func(s string) string {
		if s == "off" {
			return ""
		}
		return s
	}
	// load reads the configuration and applies the flags given, at start
	// and again on SIGHUP, so that a flag keeps overriding the file.
	load := func() (*server.Config, error) {
		// A file that parses but does not validate is checked again below
		// with the flags applied: a flag may fix it.
		cfg, err := server.LoadConfig(*cfgPath)
		if cfg == nil {
			return nil, err
		}
		for name, apply := range map[string]func(){
			"listen":      func() { cfg.EMSD.Listen = *listen },
			"smtp":        func() { cfg.SMTP.Listen = off(*smtpAddr) },
			"dtls-listen": func() { cfg.DTLS.Listen = off(*dtlsAddr) },
			"admin":       func() { cfg.Admin.Listen = off(*admin) },
			"pprof":       func() { cfg.Admin.PProf = *pprofOn },
			"data":        func() { cfg.Data = *data },
			"dsn": func() {
				cfg.Store.Driver, cfg.Store.Conninfo, cfg.Store.BusyTimeout = server.StorePostgres, *conninfo, 0
			},
			"domain":    func() { cfg.Domain = *domain },
			"smarthost": func() { cfg.Relay.Smarthost = *smarthost },
			"log-level": func() { cfg.LogLevel = *logLevel },
			"trace": func() {
				if *trace {
					cfg.LogLevel = "trace"
				}
			},
			"log-format": func() { cfg.LogFormat = *logFormat },
		} {
			if set[name] {
				apply()
			}
		}
		if set["data"] && cfg.Store.Driver == server.StorePostgres {
			// The data directory holds only the SQLite store.
			return nil, usagef("--data is for the SQLite store; the store is PostgreSQL (--dsn or store.driver)")
		}
		if err := cfg.Validate(); err != nil {
			if *cfgPath != "" {
				return nil, fmt.Errorf("%s (with the flags given): %w", *cfgPath, err) // *server.ConfigError, joined
			}
			return nil, err
		}
		return cfg, nil
	}
	cfg, err := load()
	if err != nil {
		var ce *server.ConfigError
		var ue *usageError
		if errors.As(err, &ce) || errors.As(err, &ue) {
			fmt.Fprintln(env.stderr, "emsdp serve:", err)
			return exitUsage
		}
		return fail(env, err) // unreadable file
	}
	if *check {
		if err := cfg.Write(env.stdout); err != nil {
			return fail(env, err)
		}
		fmt.Fprintln(env.stderr, "emsdp serve: configuration OK")
		return exitOK
	}
	// A LevelVar, so that log_level can change on SIGHUP.
	level := new(slog.LevelVar)
	log := slog.New(cfg.NewLogHandler(env.stderr, &slog.HandlerOptions{Level: level}))

	srv, err := server.Start(ctx, cfg, server.Options{Logger: log, LogLevel: level})
	if err != nil {
		var le *server.ListenError
		if errors.As(err, &le) {
			hint := "--listen"
			switch le.Service {
			case "smtp":
				hint = "--smtp"
			case "admin":
				hint = "--admin"
			case "dtls":
				hint = "--dtls-listen"
			}
			err = fmt.Errorf("%s %w", le.Service, serveListenHint(le.Err, le.Addr, hint))
		}
		return fail(env, err)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	a := srv.Addrs()
	where := "data=" + cfg.Data
	if cfg.Store.Driver == server.StorePostgres {
		where = "store=postgres"
	}
	dtlsWhere := ""
	if a.DTLS.IsValid() {
		dtlsWhere = " dtls=" + a.DTLS.String()
	}
	fmt.Fprintf(env.stderr, "emsdp serve: listening emsd=%s smtp=%s admin=%s %s%s\n",
		a.EMSD, addrOrOff(a.SMTP), addrOrOff(a.Admin), where, dtlsWhere)
	for {
		select {
		case <-hup:
			if *cfgPath != "" {
				// Before Reload, which then reads the certificate files
				// the new configuration names.
				reconfigure(srv, load, *cfgPath, log)
			}
			if err := srv.Reload(ctx); err != nil {
				log.Error("reload (SIGHUP)", "err", err)
			} else {
				log.Info("device registry reloaded (SIGHUP)")
			}
			continue
		case <-ctx.Done():
		}
		break
	}
	log.Info("shutting down")
	drain := time.Duration(srv.Config().Delivery.DrainTimeout) // as reloaded
	sctx, cancel := context.WithTimeout(context.Background(), drain+30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("shutdown", "err", err)
	}
	return exitOK
}

// reconfigure is SIGHUP's re-reading of the configuration file: a file
// that does not load or validate changes nothing, the server goes on with
// the configuration it runs.
func reconfigure(srv *server.Server, load func() (*server.Config, error), path string, log *slog.Logger) {
	cfg, err := load()
	if err == nil {
		_, err = srv.Reconfigure(cfg) // logs what changed and what needs a restart
	}
	if err != nil {
		log.Error("configuration not reloaded (SIGHUP); keeping the running one", "file", path, "err", err)
	}
}

// serveListenHint is listenHint naming the flag that changes the address.
func serveListenHint(err error, addr, flagName string) error {
	if errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("%w (ports below 1024 need root or CAP_NET_BIND_SERVICE; choose another with %s)", err, flagName)
	}
	return listenHint(err, addr)
}

func addrOrOff(a interface{ String() string }) string {
	if a == nil {
		return "off"
	}
	return a.String()
}
