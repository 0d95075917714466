package esro

import (
	"errors"
	"net"
	"net/netip"
	"time"
)

func (e *Endpoint) readLoop() {
	defer e.loops.Done()
	var buf []byte
	if e.batch == nil {
		buf = make([]byte, maxDatagram+1)
	}
	for {
		var n int
		var from netip.AddrPort
		var err error
		switch {
		case e.batch != nil:
			n, err = e.batch.read()
		case e.fast != nil:
			n, from, err = e.fast.ReadFromUDPAddrPort(buf)
		default:
			var a net.Addr
			n, a, err = e.conn.ReadFrom(buf)
			if ua, ok := a.(*net.UDPAddr); ok {
				from = ua.AddrPort()
			}
		}
		if err != nil {
			select {
			case <-e.closed:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient errors (e.g. ICMP reports on some systems): go on,
			// but do not spin on a persistent one.
			e.log.Warn("esro: read", "err", err)
			select {
			case <-e.closed:
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		if e.trace != nil {
			e.traceIn(n, buf, from)
		}
		now := time.Now()
		e.mu.Lock()
		if e.m.closed {
			e.mu.Unlock()
			return
		}
		if e.batch != nil {
			// Everything that queued up goes through the machine in one
			// critical section, and the replies out in one flush.
			for i := range n {
				if b, from := e.batch.datagram(i); from.IsValid() {
					e.m.receive(now, b, from)
				}
			}
		} else if from.IsValid() {
			e.m.receive(now, buf[:n], from)
		}
		e.applyICMPLocked(now)
		e.m.advance(now) // what is due, without waiting for the timer (wakeAt)
		if len(e.inline) > 0 {
			// Answers of inline handlers join this step's datagrams.
			e.mu.Unlock()
			e.runInline()
			e.mu.Lock()
			now = time.Now()
		}
		out := e.takeOut()
		e.rearm(now)
		e.mu.Unlock()
		e.flush(out)
	}
}

// traceIn shows Config.Trace what the last read returned.
func (e *Endpoint) traceIn(n int, buf []byte, from netip.AddrPort) {
	if e.batch == nil {
		if from.IsValid() {
			e.trace(false, from, buf[:n])
		}
		return
	}
	for i := range n {
		if b, from := e.batch.datagram(i); from.IsValid() {
			e.trace(false, from, b)
		}
	}
}

// runInline runs the inline handlers indicated in the last step, without
// mu, then marks them as no longer running on the loop. Read loop only.
func (e *Endpoint) runInline() {
	for i := range e.inline {
		t := &e.inline[i]
		e.call(t.ctx, t.inv, t.h)
	}
	e.mu.Lock()
	for i := range e.inline {
		e.inline[i].inv.inLoop = false
	}
	clear(e.inline)
	e.inline = e.inline[:0]
	e.mu.Unlock()
}

// rearm makes the timer fire when the machine needs it (wakeAt). An armed
// timer is only ever moved earlier, never later: firing early is harmless,
// as advance only runs what is due and the firing arms the timer again,
// while moving a timer costs a reset in the runtime's timer heap that may
// wake an idle thread to look at it. An invoker's machine wants its timer
// earlier (the INVOKE's retransmission) and then later again (the end of
// the number's hold) on every invocation: measured with 256 client
// endpoints, two resets per invocation became one reset and one firing
// per two, and the wake-ups of idle threads (futex calls) fell by a
// quarter. Called with mu held.
func (e *Endpoint) rearm(now time.Time) {
	at, ok := e.m.wakeAt()
	if !ok || e.m.closed || (e.armed && !at.Before(e.timerAt)) {
		return
	}
	d := at.Sub(now)
	if e.timer == nil {
		e.timer = time.AfterFunc(d, e.onTimer)
	} else {
		e.timer.Reset(d)
	}
	e.timerAt, e.armed = at, true
}

func (e *Endpoint) onTimer() {
	now := time.Now()
	e.mu.Lock()
	e.armed = false
	if e.m.closed {
		e.mu.Unlock()
		return
	}
	e.m.advance(now)
	out := e.takeOut()
	e.rearm(now)
	e.mu.Unlock()
	e.flush(out)
}

// takeOut hands over the machine's queued datagrams and gives it a
// recycled buffer for the next ones. Called with mu held, so the batch is
// registered with sending in the same critical section that may wake a
// caller, and Close waits for it.
func (e *Endpoint) takeOut() *[]outgoing {
	if len(e.m.out) == 0 || e.m.closed {
		e.m.out = e.m.out[:0]
		return nil
	}
	e.sending.Add(1)
	out := e.outs.Get().(*[]outgoing)
	*out, e.m.out = e.m.out, (*out)[:0]
	return out
}

// flush sends the datagrams and recycles their buffer. Called without mu.
func (e *Endpoint) flush(out *[]outgoing) {
	if out == nil {
		return
	}
	defer e.sending.Done()
	if e.trace != nil {
		for i := range *out {
			e.trace(true, (*out)[i].to, (*out)[i].payload())
		}
	}
	if e.batch != nil {
		e.batch.write(*out, &e.st, e.log)
	} else {
		for i := range *out {
			e.send(&(*out)[i])
		}
	}
	clear(*out) // drop references to PDU buffers
	*out = (*out)[:0]
	e.outs.Put(out)
	e.applyICMP() // reports a failed send read
}

// send writes one datagram.
func (e *Endpoint) send(o *outgoing) {
	b := o.payload()
	var err error
	if e.fast != nil {
		if _, err = e.fast.WriteToUDPAddrPort(b, o.to); err != nil && e.retrySend(err) {
			_, err = e.fast.WriteToUDPAddrPort(b, o.to)
		}
	} else {
		_, err = e.conn.WriteTo(b, net.UDPAddrFromAddrPort(o.to))
	}
	if err != nil {
		// Like any datagram loss: retransmission or the peer's own timers
		// recover.
		e.st.sendErrors.Add(1)
		e.log.Debug("esro: send", "to", o.to, "err", err)
		return
	}
	e.st.datagramsOut.Add(1)
	e.st.bytesOut.Add(uint64(len(b)))
}
