package sqlite

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// qPeekMany is qPeek without limits for a list of devices (a JSON array),
// with each device's contact.
var qPeekMany = `SELECT ` + deliveryCols + `, dv.next_instance,
	dv.contact_addr, dv.contact_via, dv.contact_at, dv.contact_polled
	FROM devices AS dv JOIN deliveries AS q ON q.id = (SELECT MIN(id) FROM deliveries
		WHERE device = dv.address AND state = 'queued' AND next_attempt <= ?1)
	JOIN delivery_content AS c ON c.id = q.id
	WHERE dv.address IN (SELECT value FROM json_each(?2))
	AND NOT EXISTS (SELECT 1 FROM deliveries AS f WHERE f.device = dv.address AND f.state = 'inflight')`

func qualified(table, cols string) string {
	fs := strings.Split(cols, ",")
	for i, c := range fs {
		fs[i] = table + "." + strings.TrimSpace(c)
	}
	return strings.Join(fs, ", ")
}

// PeekDeliveries reads the first attempts of many devices in one query
// (store.BatchPeeker).
func (s *DB) PeekDeliveries(ctx context.Context, addrs []uint32, now time.Time) (map[uint32]store.Peeked, error) {
	out := make(map[uint32]store.Peeked, len(addrs))
	if len(addrs) == 0 {
		return out, nil
	}
	list := make([]byte, 0, 8*len(addrs)+2)
	list = append(list, '[')
	for i, a := range addrs {
		if i > 0 {
			list = append(list, ',')
		}
		list = strconv.AppendUint(list, uint64(a), 10)
	}
	list = append(list, ']')
	rows, err := s.query(ctx, nil, qPeekMany, store.Millis(now), string(list))
	if err != nil {
		return nil, fmt.Errorf("sqlite: peek deliveries: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var next int64
		var sc scanContact
		d, err := scanDelivery(rows, append([]any{&next}, sc.dest()...)...)
		if err != nil {
			return nil, fmt.Errorf("sqlite: peek deliveries: %w", err)
		}
		d.InstanceBase = uint8(next)
		d.Contact = sc.contact()
		out[d.Device] = store.Peeked{Delivery: d, Contact: d.Contact}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sqlite: peek deliveries: %w", err)
	}
	return out, nil
}
