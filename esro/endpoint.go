package esro

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Endpoint is one ESRO engine on one datagram socket, serving both roles:
// handlers bound to SAP selectors perform incoming invocations, and Invoke
// sends invocations to peers (docs/protocol.md ESRO §7). All methods are safe for
// concurrent use.
type Endpoint struct {
	conn  net.PacketConn
	fast  udpAddrPortConn // conn's allocation-free methods, when it has them
	batch batchIO         // batched I/O on a plain UDP socket, where supported
	log   *slog.Logger
	trace func(out bool, peer netip.AddrPort, pdu []byte)

	mu      sync.Mutex
	m       *machine
	timer   *time.Timer
	timerAt time.Time
	armed   bool

	st       counters
	outs     sync.Pool      // of *[]outgoing, recycled between sends
	sending  sync.WaitGroup // batches taken from the machine and not yet sent
	loops    sync.WaitGroup // the read loop
	handlers sync.WaitGroup
	closed   chan struct{}
	once     sync.Once

	// Handler workers (see indicate): tasks go to an idle worker through
	// work; idle counts the workers waiting on it.
	work chan task
	idle atomic.Int32

	// Inline handlers (HandleInline) indicated during the current step of
	// the read loop, run by it once the step's lock is released.
	inline []task
	ctx    context.Context // inline handlers' context, cancelled at Close
	cancel context.CancelFunc
}

// task is a performer invocation to hand to its handler.
type task struct {
	inv *invocation
	h   Handler
	ctx context.Context
}

// maxIdleWorkers bounds the handler workers kept waiting for work; beyond
// it a worker that finishes its handler exits.
const maxIdleWorkers = 64

type udpAddrPortConn interface {
	ReadFromUDPAddrPort(b []byte) (int, netip.AddrPort, error)
	WriteToUDPAddrPort(b []byte, addr netip.AddrPort) (int, error)
}

// batchIO moves several datagrams per system call (batch_linux.go).
type batchIO interface {
	// read waits for one or more datagrams and returns how many arrived.
	read() (int, error)
	// datagram returns datagram i of the last read; valid until the next.
	datagram(i int) ([]byte, netip.AddrPort)
	// write sends out and counts each datagram as sent or failed.
	write(out []outgoing, st *counters, log *slog.Logger)
}

// Listen opens a UDP socket on address ("host:port"; network "udp", "udp4"
// or "udp6") and starts an Endpoint on it.
func Listen(network, address string, cfg *Config) (*Endpoint, error) {
	if _, err := cfg.resolved(); err != nil {
		return nil, err
	}
	conn, err := net.ListenPacket(network, address)
	if err != nil {
		return nil, fmt.Errorf("esro: listen: %w", err)
	}
	ep, err := NewEndpoint(conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return ep, nil
}

// NewEndpoint starts an Endpoint on conn, which it owns from then on: Close
// closes it. conn may be any net.PacketConn whose addresses are *net.UDPAddr
// (a UDP socket, or an in-memory network in tests). On Linux a
// *net.UDPConn itself is read with recvmmsg and written with sendmmsg, so
// that datagrams queued at a busy socket cost one system call together;
// wrapped or other connections are used through their methods. On an
// AuthenticatedConn every source counts as proven.
func NewEndpoint(conn net.PacketConn, cfg *Config) (*Endpoint, error) {
	c, err := cfg.resolved()
	if err != nil {
		return nil, err
	}
	c.peersAuthenticated = peersAuthenticated(conn)
	e := &Endpoint{conn: conn, log: c.Logger, trace: c.Trace, closed: make(chan struct{}), work: make(chan task)}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	e.fast, _ = conn.(udpAddrPortConn)
	e.batch = newBatchConn(conn)
	e.wireICMP()
	e.outs.New = func() any { s := make([]outgoing, 0, 4); return &s }
	e.m = newMachine(c, &e.st, e)
	e.loops.Add(1)
	go e.readLoop()
	return e, nil
}

// LocalAddr is the socket's address.
func (e *Endpoint) LocalAddr() net.Addr { return e.conn.LocalAddr() }

// Stats returns a snapshot of the endpoint's counters.
func (e *Endpoint) Stats() Stats {
	if src, ok := e.batch.(icmpSource); ok {
		src.refreshDrops()
	}
	return e.st.snapshot()
}

// Handle binds sap (1..15) with a handshake and a handler (SAP-BIND, see
// docs/protocol.md ESRO §3.3). INVOKEs for an unbound SAP are answered FAILURE(2).
func (e *Endpoint) Handle(sap uint8, hs Handshake, h Handler) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.m.bind(sap, hs, h)
}

// HandleInline binds sap like Handle, for a handler that never blocks:
// it runs on the endpoint's read loop itself, between two reads, with no
// goroutine and no context of its own, and its answer leaves in the same
// batch of datagrams as everything else that read caused. That is the
// fastest way to serve, and the handler's contract is strict:
//
//   - It must return quickly and must not wait for anything (I/O, locks
//     held elsewhere for long, channels): while it runs the endpoint
//     reads nothing, for every peer.
//   - It should answer (Result or Error) before it returns; an answer
//     given later from another goroutine works but costs a flush of its
//     own.
//   - Confirmed returns ErrInline at once rather than deadlock.
//   - ctx is the endpoint's, cancelled only at Close.
//   - inv.Data is the datagram in the receive buffer, valid only until
//     the handler returns: a handler that keeps it (or hands it to
//     another goroutine) copies it. Result and Error copy what they are
//     given.
//
// A handler that panics is logged and the invocation times out, as with
// Handle.
func (e *Endpoint) HandleInline(sap uint8, hs Handshake, h Handler) error {
	if h == nil {
		return e.Handle(sap, hs, nil)
	}
	return e.Handle(sap, hs, inlineHandler{h})
}

// inlineHandler marks a binding made by HandleInline.
type inlineHandler struct{ Handler }

// HandleFunc binds sap to a handler function.
func (e *Endpoint) HandleFunc(sap uint8, hs Handshake, f func(ctx context.Context, w ResponseWriter, inv *Invocation)) error {
	return e.Handle(sap, hs, HandlerFunc(f))
}

// Unbind releases sap. Its live invocations end without further
// indications; their handlers' contexts are cancelled with ErrSAPNotBound.
func (e *Endpoint) Unbind(sap uint8) error {
	e.mu.Lock()
	err := e.m.unbind(time.Now(), sap)
	e.rearm(time.Now())
	e.mu.Unlock()
	return err
}

// Invoke performs one remote operation and returns its RESULT, or an error
// that is an *ErrorReply for an ERROR, a *Failure when the provider reports
// a failure (docs/protocol.md ESRO §5.6), or the context's error.
//
// When all 256 reference numbers towards the peer are held (each is held
// until T_ref after its invocation ends, docs/protocol.md ESRO §4), Invoke waits for
// one to free up, for as long as ctx allows. If ctx ends after the INVOKE
// was sent, retransmission stops and the number is held for T_ref.
func (e *Endpoint) Invoke(ctx context.Context, req *Request) (*Result, error) {
	if err := req.validate(e.m.cfg.PDUSize); err != nil {
		return nil, err
	}
	to := netip.AddrPortFrom(req.To.Addr().Unmap(), req.To.Port())
	var inv *invocation
	for inv == nil {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		now := time.Now()
		e.mu.Lock()
		e.m.advance(now) // frees the numbers whose hold ended (wakeAt)
		i, wait, err := e.m.invoke(now, req, to)
		if err != nil {
			e.mu.Unlock()
			return nil, err
		}
		if wait != nil {
			e.mu.Unlock()
			select {
			case <-wait:
			case <-ctx.Done():
				e.mu.Lock()
				e.m.stopWaiting(to, wait)
				e.mu.Unlock()
				return nil, ctx.Err()
			}
			continue
		}
		inv = i
		out := e.takeOut()
		e.rearm(now)
		e.mu.Unlock()
		e.flush(out)
		inv.sent.Store(true) // its buffer may carry the reply now (replyData)
	}
	select {
	case <-inv.done:
	case <-ctx.Done():
		e.mu.Lock()
		e.m.abandon(time.Now(), inv, ctx.Err())
		e.rearm(time.Now())
		e.mu.Unlock()
		<-inv.done
	}
	// The machine sends exactly one token and never touches the channel
	// after: it can serve another invocation.
	e.m.recycleToken(inv.done)
	return inv.res, inv.err
}

// Shutdown stops accepting new invocations (incoming INVOKEs are dropped,
// so that the peer retransmits to whoever serves next; Invoke returns
// ErrClosed) and waits until no invocation still needs this endpoint —
// replies owed or awaited. Then, unless Config.NoLinger is set, it
// lingers while a performer may still retransmit a reply this endpoint
// acknowledged (its ACK may have been lost), acknowledging every
// retransmission again: until the performers have been quiet for one
// retransmission interval T_retx, plus 2·RT or the measured round-trip
// timeout when longer, after the last reply or duplicate; for more
// intervals when the link to the peer has lost datagrams; never beyond a
// performer's retry budget, N·T_retx after its reply. With the shipped
// timers that is 5 s on a clean link and at most 26 s on a lossy one.
// Then Shutdown closes the endpoint. If ctx ends first, or Close is
// called, it closes at once; a ctx that ended makes it return ctx's
// error.
func (e *Endpoint) Shutdown(ctx context.Context) error {
	e.mu.Lock()
	e.m.shutdown()
	drained := e.m.drained
	e.mu.Unlock()
	var err error
	select {
	case <-drained:
		if !e.m.cfg.NoLinger {
			err = e.linger(ctx)
		}
	case <-ctx.Done():
		err = ctx.Err()
	}
	if cerr := e.Close(); err == nil {
		err = cerr
	}
	return err
}

// linger waits until the machine's linger deadline, which duplicates
// arriving meanwhile may push back, until ctx ends or until someone
// closes the endpoint.
func (e *Endpoint) linger(ctx context.Context) error {
	var t *time.Timer
	for {
		e.mu.Lock()
		d := time.Until(e.m.lingerUntil)
		e.mu.Unlock()
		if d <= 0 {
			return nil
		}
		if t == nil {
			t = time.NewTimer(d)
			defer t.Stop()
		} else {
			t.Reset(d)
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		case <-e.closed:
			return nil
		}
	}
}

// Close ends every invocation (waiting Invoke calls return ErrClosed,
// handler contexts are cancelled), closes the socket and waits for the read
// loop and for handlers to return.
func (e *Endpoint) Close() error {
	var err error
	e.once.Do(func() {
		e.mu.Lock()
		e.m.close()
		if e.timer != nil {
			e.timer.Stop()
		}
		e.mu.Unlock()
		close(e.closed)
		e.cancel()
		// A caller woken by an indication may close us before the
		// datagrams queued in the same step (an ACK after a RESULT) are
		// written: let them go out first.
		e.sending.Wait()
		err = e.conn.Close()
		e.loops.Wait()
		e.handlers.Wait()
	})
	return err
}
