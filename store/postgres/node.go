package postgres

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

// node is this handle's identity towards the other processes: an id from
// the node_ids sequence and a session advisory lock on it, held over a
// connection of its own for as long as the handle is open.
type node struct {
	id     int32
	db     *DB
	cfg    *pgx.ConnConfig
	every  time.Duration
	conn   *pgx.Conn // owned by keep; nil while reconnecting
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// newNode connects, draws a node id and locks it; start runs the keeper.
func newNode(ctx context.Context, db *DB, cc *pgx.ConnConfig, every time.Duration) (*node, error) {
	cfg := cc.Copy()
	rp := cfg.RuntimeParams
	// The server notices a vanished host (no FIN) within about 30 s and
	// ends the session, which frees the node lock. Ignored on Unix sockets.
	rp["tcp_keepalives_idle"], rp["tcp_keepalives_interval"], rp["tcp_keepalives_count"] = "10", "5", "3"
	rp["tcp_user_timeout"] = "30000"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: node connection: %w", err)
	}
	n := &node{db: db, cfg: cfg, every: every, conn: conn, done: make(chan struct{})}
	// The sequence cycles after 2^31 ids: skip one still held.
	for {
		var ok bool
		err := conn.QueryRow(ctx, `SELECT id, pg_try_advisory_lock($1, id) FROM (SELECT nextval('node_ids')::int AS id) AS n`,
			db.keys.node).Scan(&n.id, &ok)
		if err != nil {
			conn.Close(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("postgres: node id: %w", err)
		}
		if ok {
			break
		}
	}
	// For operators: pg_stat_activity shows which session is which node.
	if _, err := conn.Exec(ctx, `SELECT set_config('application_name', $1, false)`,
		fmt.Sprintf("emsdp node %d", n.id)); err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("postgres: node connection: %w", err)
	}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	return n, nil
}

func (n *node) start() { go n.keep() }

// keep checks the node lock and looks for the work of gone nodes every
// n.every/keepChecks, and sweeps up the work of a node once it has been
// seen gone for n.every: a brief loss of its lock (a reconnect, a
// database restart: every node re-locks at its next check, well within
// n.every) does not look like a crash, and a crashed node's work is
// taken over n.every to n.every·(1+1/keepChecks) after its session
// ended.
func (n *node) keep() {
	defer close(n.done)
	t := time.NewTicker(max(n.every/keepChecks, time.Millisecond))
	defer t.Stop()
	suspects := map[int32]time.Time{} // gone nodes: first seen gone
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
		n.hold()
		ctx, cancel := context.WithTimeout(n.ctx, max(n.every, 10*time.Second))
		if err := n.db.sweep(ctx, suspects, time.Now(), n.every); err != nil {
			clear(suspects) // look afresh: they must be seen gone for n.every again
		}
		cancel()
	}
}

// keepChecks is how many lock checks and sweeps the keeper makes per
// period.
const keepChecks = 5

// hold makes sure the node lock is held, reconnecting and re-locking the
// same id after the connection broke. Work claimed meanwhile stays ours
// unless another node swept it; the finish of such work then fails with
// ErrConflict (the owner check), which is what fencing needs.
func (n *node) hold() {
	if n.ctx.Err() != nil {
		return // stopping
	}
	ctx, cancel := context.WithTimeout(n.ctx, max(n.every, 10*time.Second))
	defer cancel()
	if n.conn != nil {
		if n.conn.Ping(ctx) == nil {
			return
		}
		n.conn.Close(ctx)
		n.conn = nil
	}
	conn, err := pgx.ConnectConfig(ctx, n.cfg)
	if err != nil {
		return
	}
	var ok bool
	// try: the old session may linger on the server for a moment; then
	// the next round tries again.
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, $2)`, n.db.keys.node, n.id).Scan(&ok); err != nil || !ok {
		conn.Close(ctx)
		return
	}
	conn.Exec(ctx, `SELECT set_config('application_name', $1, false)`, fmt.Sprintf("emsdp node %d", n.id))
	n.conn = conn
}

// stop ends the keeper and releases the node lock: once it returns, the
// node counts as gone for every other handle.
func (n *node) stop() {
	n.cancel()
	<-n.done
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if n.conn != nil {
		// Unlock explicitly: after a mere disconnect the server frees
		// session locks only once the backend has exited.
		_, err := n.conn.Exec(ctx, `SELECT pg_advisory_unlock($1, $2)`, n.db.keys.node, n.id)
		n.conn.Close(ctx)
		n.conn = nil
		if err == nil {
			return
		}
	}
	// The session ended some other way (the keeper was cut off mid-check):
	// wait until the server has let go.
	for {
		var held bool
		err := n.db.pool.QueryRow(ctx, `SELECT $2::int IN (`+liveNodes+`)`, n.db.keys.node, n.id).Scan(&held)
		if err != nil || !held {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// liveNodes is a subquery of the nodes whose lock is held; $1 is the node
// lock key.
const liveNodes = `SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
	AND classid::bigint = $1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`

// sweep re-queues the in-flight work of the nodes gone now that were
// first seen gone (suspects) at least 'after' ago, and updates suspects:
// the nodes gone now, each with when it was first seen gone.
func (s *DB) sweep(ctx context.Context, suspects map[int32]time.Time, now time.Time, after time.Duration) error {
	rows, err := s.query(ctx, `SELECT owner FROM deliveries WHERE state = 'inflight' AND owner <> $2
		AND owner NOT IN (`+liveNodes+`)
		UNION SELECT owner FROM relays WHERE state = 'sending' AND owner <> $2 AND owner NOT IN (`+liveNodes+`)`,
		s.keys.node, s.nodeID())
	if err != nil {
		return err
	}
	gone, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return err
	}
	// A gone node whose work is no longer in flight had it re-queued by
	// another handle's sweep (or came back and finished it): this
	// handle's owner is told as well, so that whichever handle sweeps,
	// every server takes the work over at once.
	signal := false
	for id := range suspects {
		if !slices.Contains(gone, id) {
			delete(suspects, id)
			signal = true
		}
	}
	var confirmed []int32
	for _, id := range gone {
		first, ok := suspects[id]
		switch {
		case !ok:
			suspects[id] = now
		case now.Sub(first) >= after:
			confirmed = append(confirmed, id)
		}
	}
	if len(confirmed) > 0 {
		// Signalled even when another handle's sweep won the race (it
		// re-queued nothing then): the work is queued either way.
		if _, err := s.requeue(ctx, confirmed); err != nil {
			return err
		}
		signal = true
		for _, id := range confirmed {
			delete(suspects, id)
		}
	}
	if signal {
		select {
		case s.requeued <- struct{}{}:
		default:
		}
	}
	return nil
}

// requeue puts in-flight deliveries and sending relays back in the queue
// (attempts unchanged, as store/sqlite's Recover): with owners nil, those
// of this node and of every gone node (Recover); else those of the given
// nodes that are gone (sweep). The liveness check is part of each
// statement, so a node that came back meanwhile keeps its work.
func (s *DB) requeue(ctx context.Context, owners []int32) (store.Recovered, error) {
	cond, who := `(owner = $3 OR owner NOT IN (`+liveNodes+`))`, any(s.nodeID())
	if owners != nil {
		cond, who = `owner = ANY($3) AND owner NOT IN (`+liveNodes+`)`, owners
	}
	var rec store.Recovered
	err := s.tx(ctx, func(tx pgx.Tx) error {
		now := store.Millis(time.Now())
		t, err := tx.Exec(ctx, `UPDATE deliveries SET state = 'queued', owner = 0, updated = $2
			WHERE state = 'inflight' AND `+cond, s.keys.node, now, who)
		if err != nil {
			return errorf("recover", err)
		}
		rec.Deliveries = int(t.RowsAffected())
		t, err = tx.Exec(ctx, `UPDATE relays SET state = 'queued', owner = 0, updated = $2
			WHERE state = 'sending' AND `+cond, s.keys.node, now, who)
		if err != nil {
			return errorf("recover", err)
		}
		rec.Relays = int(t.RowsAffected())
		return nil
	})
	return rec, err
}
