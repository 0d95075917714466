package main

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
)

// The raw-UDP baseline: the exchange ESRO performs, with nothing but
// datagrams on plain sockets, so that ESRO's rows can be given as a
// share of what the machine does anyway. A 2-datagram exchange is request
// and reply; a 3-datagram one adds the ACK that the client's reader sends
// when the reply arrives, as an ESRO invoker does. The server echoes from
// its read loop; clients are esroSockets sockets, each with one reader
// that hands replies to the waiting callers. No retransmission: a caller
// whose reply has not come after rawTimeout counts as failed.
//
// Datagram: kind (rawReq, rawReply, rawAck), a 4-octet id, the payload.
const (
	rawReq   = 'I'
	rawReply = 'R'
	rawAck   = 'A'
	rawHdr   = 5

	rawTimeout = time.Second
)

var errRawTimeout = errors.New("raw udp: no reply")

type rawClient struct {
	s       *rawSock
	mu      sync.Mutex
	nextID  uint32
	pending map[uint32]rawWait
}

type rawWait struct {
	ch chan bool
	at time.Time
}

func rawLoad(ctx context.Context, o *benchOptions, hs esro.Handshake, size, conc int) (loadStats, error) {
	var calls atomic.Uint64
	var wg sync.WaitGroup
	var conns []*net.UDPConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}()
	listen := func() (*rawSock, error) {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return nil, err
		}
		conns = append(conns, c)
		return newRawSock(c, &calls)
	}
	srv, err := listen()
	if err != nil {
		return loadStats{}, err
	}
	if _, err := esro.SetReceiveBuffer(srv.conn, serverRcvBuf); err != nil {
		return loadStats{}, err
	}
	to := srv.conn.LocalAddr().(*net.UDPAddr).AddrPort()
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := srv.read(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			if n >= rawHdr && buf[0] == rawReq {
				buf[0] = rawReply
				srv.write(buf[:n], from)
			}
		}
	})
	clients := make([]*rawClient, esroSockets)
	for i := range clients {
		s, err := listen()
		if err != nil {
			return loadStats{}, err
		}
		c := &rawClient{s: s, pending: map[uint32]rawWait{}}
		clients[i] = c
		wg.Go(func() {
			buf := make([]byte, 65536)
			var ack [rawHdr]byte
			ack[0] = rawAck
			for {
				n, _, err := s.read(buf)
				if err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					continue
				}
				if n < rawHdr || buf[0] != rawReply {
					continue
				}
				id := binary.BigEndian.Uint32(buf[1:])
				c.mu.Lock()
				w, ok := c.pending[id]
				delete(c.pending, id)
				c.mu.Unlock()
				if !ok {
					continue
				}
				if hs == esro.ThreeWay {
					copy(ack[1:], buf[1:rawHdr])
					s.write(ack[:], to)
				}
				w.ch <- true
			}
		})
	}
	// Replies lost on the way (a full socket buffer) fail their callers.
	stopJanitor := make(chan struct{})
	defer close(stopJanitor)
	wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopJanitor:
				return
			case now := <-t.C:
				for _, c := range clients {
					c.mu.Lock()
					for id, w := range c.pending {
						if now.Sub(w.at) > rawTimeout {
							delete(c.pending, id)
							w.ch <- false
						}
					}
					c.mu.Unlock()
				}
			}
		}
	})
	chans := make([]chan bool, conc)
	reqs := make([][]byte, conc)
	for i := range conc {
		chans[i] = make(chan bool, 1)
		reqs[i] = make([]byte, rawHdr+size)
		reqs[i][0] = rawReq
	}
	st := closedLoopCounted(ctx, conc, o.duration/4, o.duration, calls.Load, func(ctx context.Context, w int, seq int64) error {
		c := clients[seq%esroSockets]
		req := reqs[w]
		c.mu.Lock()
		c.nextID++
		id := c.nextID
		c.pending[id] = rawWait{ch: chans[w], at: time.Now()}
		c.mu.Unlock()
		binary.BigEndian.PutUint32(req[1:], id)
		if err := c.s.write(req, to); err != nil {
			c.mu.Lock()
			_, still := c.pending[id]
			delete(c.pending, id)
			c.mu.Unlock()
			if still {
				return err
			}
		}
		select {
		case ok := <-chans[w]:
			if !ok {
				return errRawTimeout
			}
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	return st, nil
}
