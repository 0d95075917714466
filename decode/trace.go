package decode

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"time"
)

// LevelTrace is the log level of PDU traces, below debug: `log_level =
// "trace"` or --trace turns it on.
const LevelTrace = slog.Level(-8)

// ParseLevel parses a log level name: trace, debug, info, warn or error
// (slog's forms, such as "debug-2", also work).
func ParseLevel(s string) (slog.Level, error) {
	if s == "trace" || s == "TRACE" {
		return LevelTrace, nil
	}
	var lv slog.Level
	err := lv.UnmarshalText([]byte(s))
	return lv, err
}

// ReplaceLevel is a slog.HandlerOptions.ReplaceAttr that names
// LevelTrace "TRACE" rather than "DEBUG-4".
func ReplaceLevel(groups []string, a slog.Attr) slog.Attr {
	if a.Key == slog.LevelKey && len(groups) == 0 {
		if lv, ok := a.Value.Any().(slog.Level); ok && lv <= LevelTrace {
			a.Value = slog.StringValue("TRACE")
		}
	}
	return a
}

// NewTracer returns a function for esro.Config.Trace that logs every
// datagram in and out, decoded in one line, at LevelTrace on log: dir
// (in, out), peer (ip:port) and pdu. Passwords are masked. It costs one
// level check per datagram while the level is above trace; the level may
// change at run time (a slog.LevelVar). It is safe for concurrent use.
func NewTracer(log *slog.Logger) func(out bool, peer netip.AddrPort, pdu []byte) {
	t := &tracer{log: log, d: New()}
	return t.trace
}

type tracer struct {
	log *slog.Logger
	mu  sync.Mutex
	d   *Decoder
}

func (t *tracer) trace(out bool, peer netip.AddrPort, pdu []byte) {
	ctx := context.Background()
	if !t.log.Enabled(ctx, LevelTrace) {
		return
	}
	peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
	// The local address is left out: one endpoint has one.
	src, dst, dir := peer, netip.AddrPort{}, "in"
	if out {
		src, dst, dir = dst, src, "out"
	}
	t.mu.Lock()
	r := t.d.Datagram(time.Now(), src, dst, pdu)
	if r.ESRO != nil {
		r.ESRO.InvokeFrame = 0 // frame numbers mean nothing in a log
	}
	line := r.Line()
	t.mu.Unlock()
	t.log.LogAttrs(ctx, LevelTrace, "pdu", slog.String("dir", dir), slog.String("peer", peer.String()),
		slog.String("pdu", line))
}
