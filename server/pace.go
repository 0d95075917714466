package server

import (
	"context"
	"sync"
	"time"
)

// pacer is a token bucket for new delivery invocations (RFC 8085 §3.1:
// an application talking to many destinations paces its aggregate), so
// that a server with a large backlog (back after an outage, or a fleet
// after a start) does not send it all at once. rate is in invocations
// per second (0: no limit), burst the bucket's size.
//
// A caller takes its token at once and waits until the bucket has paid
// for it, so that callers are served in the order they came; one that
// gives up returns its token.
type pacer struct {
	mu     sync.Mutex
	tokens float64
	last   time.Time
}

// wait blocks until an invocation may go out under rate and burst, and
// reports how long it waited.
func (p *pacer) wait(ctx context.Context, rate float64, burst int) (time.Duration, error) {
	if rate <= 0 {
		return 0, nil
	}
	b := float64(max(burst, 1))
	p.mu.Lock()
	now := time.Now()
	if p.last.IsZero() {
		p.tokens = b
	} else {
		p.tokens = min(p.tokens+now.Sub(p.last).Seconds()*rate, b)
	}
	p.last = now
	p.tokens--
	owed := p.tokens
	p.mu.Unlock()
	if owed >= 0 {
		return 0, nil
	}
	d := time.Duration(-owed / rate * float64(time.Second))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return d, nil
	case <-ctx.Done():
		p.mu.Lock()
		p.tokens++
		p.mu.Unlock()
		return 0, ctx.Err()
	}
}
