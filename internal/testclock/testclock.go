// Package testclock is a clock that tests move by hand, for code that
// takes a func() time.Time.
package testclock

import (
	"sync"
	"time"
)

// Clock starts at a fixed instant and moves only when told.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// New returns a clock at 2026-01-02 03:04:05 UTC.
func New() *Clock { return At(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)) }

// At returns a clock at t.
func At(t time.Time) *Clock { return &Clock{t: t} }

// Now is the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}
