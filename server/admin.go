package server

import (
	"context"
	"fmt"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// adminHandler serves /metrics, /healthz and, unless admin.pprof is
// false, /debug/pprof.
func (s *Server) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{Registry: s.metrics.reg}))
	mux.HandleFunc("/healthz", s.healthz)
	if !s.conf().Admin.PProf {
		return mux
	}
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// healthz answers 200 when the store answers, every configured listener
// serves, no outcome write is failing and no queue entry is stuck in
// flight past its deadline; 503 with the reasons otherwise.
func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	var bad []string
	if err := s.st.Ping(ctx); err != nil {
		bad = append(bad, "store: "+err.Error())
	}
	if s.ctx.Err() != nil {
		bad = append(bad, "emsd: closed")
	}
	if s.smtpLn != nil && !s.smtpUp.Load() {
		bad = append(bad, "smtp: not serving")
	}
	bad = append(bad, s.sched.out.health()...)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if len(bad) > 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, strings.Join(bad, "\n"))
		return
	}
	fmt.Fprintln(w, "ok")
}
