package esro

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// TestHandlerCtx: the lazily made context behaves as the
// context.WithCancelCause it stands for, whether it is first used before
// or after the invocation ends.
func TestHandlerCtx(t *testing.T) {
	cause := errors.New("the cause")
	for _, tc := range []struct {
		name        string
		useBefore   bool // the handler touches ctx before the cancel
		cancels     []error
		wantCause   error
		wantEnded   bool
		deriveChild bool
	}{
		{name: "never cancelled", useBefore: true},
		{name: "used before the cancel", useBefore: true, cancels: []error{cause}, wantCause: cause, wantEnded: true},
		{name: "first used after the cancel", cancels: []error{cause}, wantCause: cause, wantEnded: true},
		{name: "first cause stays", cancels: []error{cause, ErrInvocationEnded}, wantCause: cause, wantEnded: true},
		{name: "child derived before the cancel", useBefore: true, deriveChild: true, cancels: []error{ErrClosed}, wantCause: ErrClosed, wantEnded: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			c := &handlerCtx{mu: &mu}
			var ctx context.Context = c
			if tc.deriveChild {
				child, stop := context.WithTimeout(ctx, time.Hour)
				defer stop()
				ctx = child
			}
			if tc.useBefore && ctx.Err() != nil {
				t.Fatalf("Err before any cancel: %v", ctx.Err())
			}
			for _, e := range tc.cancels {
				mu.Lock()
				c.cancel(e)
				mu.Unlock()
			}
			select {
			case <-ctx.Done():
				if !tc.wantEnded {
					t.Fatal("Done closed without a cancel")
				}
			default:
				if tc.wantEnded {
					t.Fatal("Done not closed after the cancel")
				}
			}
			if tc.wantEnded && !errors.Is(ctx.Err(), context.Canceled) {
				t.Errorf("Err = %v, want context.Canceled", ctx.Err())
			}
			if got := context.Cause(ctx); tc.wantEnded && got != tc.wantCause {
				t.Errorf("Cause = %v, want %v", got, tc.wantCause)
			}
			if _, ok := ctx.Deadline(); ok && !tc.deriveChild {
				t.Error("a handler context with a deadline")
			}
		})
	}
}

// TestHandlerCtxInline: an inline handler's invocation has no handler
// context (its handler gets the endpoint's); cancelling it is a no-op.
func TestHandlerCtxInline(t *testing.T) {
	var c handlerCtx
	c.cancel(ErrClosed)
	if c.cause != nil || c.real.Load() != nil {
		t.Fatal("cancel of an unused handler context recorded something")
	}
}
