package esro

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// handlerCtx is the context a handler worker gets for one performer
// invocation. Most handlers answer without ever looking at their context,
// and a cancellable context costs two allocations: so the real one
// (context.WithCancelCause) is made only when the handler first calls one
// of its methods, already cancelled with the recorded cause if the
// invocation ended meanwhile. It lives in the invocation; the machine
// cancels it through cancel, with the endpoint's lock held, which is the
// lock that making the real context takes too. context.Cause works on it:
// Value reaches the real context's.
type handlerCtx struct {
	mu    *sync.Mutex // the endpoint's; nil for an inline handler's invocation
	cause error       // the first cancellation's cause, under mu
	real  atomic.Pointer[cancelled]
}

type cancelled struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// get returns the real context, making it on first use.
func (c *handlerCtx) get() context.Context {
	if r := c.real.Load(); r != nil {
		return r.ctx
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if r := c.real.Load(); r != nil {
		return r.ctx
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	if c.cause != nil {
		cancel(c.cause)
	}
	c.real.Store(&cancelled{ctx, cancel})
	return ctx
}

// cancel ends the context with cause; the first cause stays, as with
// context.CancelCauseFunc. Called with the endpoint's lock held.
func (c *handlerCtx) cancel(cause error) {
	if c.mu == nil || c.cause != nil {
		return
	}
	c.cause = cause
	if r := c.real.Load(); r != nil {
		r.cancel(cause)
	}
}

// Deadline: a handler's context has none (Config.PerformerTimeout cancels
// it instead).
func (c *handlerCtx) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c *handlerCtx) Done() <-chan struct{}       { return c.get().Done() }
func (c *handlerCtx) Err() error                  { return c.get().Err() }
func (c *handlerCtx) Value(key any) any           { return c.get().Value(key) }
