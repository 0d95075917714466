package esro

import (
	"context"
	"time"
)

// indicate hands a new performer invocation to its handler. Called by the
// machine with mu held. An inline handler (HandleInline) is queued for the
// read loop. Any other runs on a handler worker: an idle one if there is
// one, else a new one, which stays for later invocations (up to
// maxIdleWorkers of them wait), so that steady load starts no goroutine
// per invocation and handlers run on stacks already grown. The handler's
// context (handlerCtx) is not derived from an endpoint-wide one (that
// would cost a registration per invocation) and is made only if the
// handler uses it: the machine cancels it whenever the invocation ends,
// including at Close.
func (e *Endpoint) indicate(inv *invocation, h Handler) {
	inv.resp = responder{e: e, inv: inv}
	if ih, ok := h.(inlineHandler); ok {
		inv.inLoop = true
		e.inline = append(e.inline, task{inv, ih.Handler, e.ctx})
		return
	}
	inv.hctx.mu = &e.mu
	t := task{inv, h, &inv.hctx}
	select {
	case e.work <- t:
	default:
		e.handlers.Add(1)
		go e.worker(t)
	}
}

// worker serves t, then further tasks while it is one of at most
// maxIdleWorkers waiting, until Close.
func (e *Endpoint) worker(t task) {
	defer e.handlers.Done()
	for {
		e.call(t.ctx, t.inv, t.h)
		t = task{} // keep nothing of it while idle
		if e.idle.Add(1) > maxIdleWorkers {
			e.idle.Add(-1)
			return
		}
		select {
		case t = <-e.work:
			e.idle.Add(-1)
		case <-e.closed:
			e.idle.Add(-1)
			return
		}
	}
}

// call runs one handler, surviving its panic: like net/http, one bad
// handler must not take the endpoint down. The invocation then times out.
func (e *Endpoint) call(ctx context.Context, inv *invocation, h Handler) {
	defer func() {
		if r := recover(); r != nil {
			e.log.Error("esro: handler panic", "sap", inv.sap, "peer", inv.addr, "panic", r)
		}
	}()
	h.ServeESRO(ctx, &inv.resp, &inv.call)
}

type responder struct {
	e   *Endpoint
	inv *invocation
}

func (r *responder) Result(enc Encoding, data []byte) error {
	return r.e.answer(r.inv, false, enc, 0, data)
}

func (r *responder) Error(enc Encoding, value uint8, data []byte) error {
	return r.e.answer(r.inv, true, enc, value, data)
}

func (r *responder) Confirmed(ctx context.Context) error {
	r.e.mu.Lock()
	if r.inv.inLoop {
		r.e.mu.Unlock()
		return ErrInline
	}
	if r.inv.finished {
		err := r.inv.err
		r.e.mu.Unlock()
		return err
	}
	if r.inv.done == nil {
		r.inv.done = make(chan struct{})
	}
	done := r.inv.done
	r.e.mu.Unlock()
	select {
	case <-done:
		return r.inv.err // written before done was closed
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (e *Endpoint) answer(inv *invocation, isErr bool, enc Encoding, value uint8, data []byte) error {
	now := time.Now()
	e.mu.Lock()
	err := e.m.answer(now, inv, isErr, enc, value, data)
	if inv.inLoop {
		// An inline handler: the read loop flushes after it returns.
		e.mu.Unlock()
		return err
	}
	out := e.takeOut()
	e.rearm(now)
	e.mu.Unlock()
	e.flush(out)
	return err
}
