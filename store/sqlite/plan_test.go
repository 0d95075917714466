package sqlite

import (
	"context"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestDeliveryPlans: no statement of the deliveries reads the whole table;
// each finds its rows through an index (schema.go's partial indices need
// the states written as literals, which this catches when one is not).
// Reading every queued row is the rebuild's (QueuedDevices, from the
// start), through an index that holds only those rows.
func TestDeliveryPlans(t *testing.T) {
	ctx := context.Background()
	db, err := Open(ctx, filepath.Join(t.TempDir(), FileName), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	// Statements on deliveries that write no queued row's index entries
	// or are inserts have no plan to check.
	qs := append(hotStatements(), qRecoverDeliveries, qPurgeDeliveries, qCountDeliveries)
	// A scan of a table or alias with no index ("SCAN deliveries", "SCAN
	// q"); a scan "USING ... INDEX" reads an index only.
	fullScan := regexp.MustCompile(`^SCAN (deliveries|q|f)$`)
	wantIndex := map[string]string{
		qQueuedDevices:     "deliveries_queue",
		qChangedDevices:    "deliveries_changed",
		qDeviceNextDue:     "deliveries_queue",
		qClaimable:         "deliveries_queue",
		qPeek:              "deliveries_inflight",
		qPeekMany:          "deliveries_queue",
		qInFlight:          "deliveries_inflight",
		qWakeWaiting:       "deliveries_queue",
		qNextDue:           "deliveries_expires",
		qExpiredDeliveries: "deliveries_expires",
		qRecoverDeliveries: "deliveries_inflight",
		qPurgeDeliveries:   "deliveries_done",
		qCountDeliveries:   "deliveries_done",
	}
	checked := 0
	for _, q := range qs {
		if !strings.Contains(q, "deliveries") || strings.HasPrefix(strings.TrimSpace(q), "INSERT") {
			continue
		}
		rows, err := db.sql.QueryContext(ctx, "EXPLAIN QUERY PLAN "+q, make([]any, nParams(q))...)
		if err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		var plan []string
		for rows.Next() {
			var id, parent, unused int
			var detail string
			if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, detail)
		}
		rows.Close()
		text := strings.Join(plan, "\n")
		for _, l := range plan {
			// (A subquery's rows, "CO-ROUTINE q", are not the table's.)
			if m := fullScan.FindStringSubmatch(l); m != nil && !slices.Contains(plan, "CO-ROUTINE "+m[1]) {
				t.Errorf("reads the whole table:\n%s\nplan:\n%s", q, text)
			}
		}
		if want := wantIndex[q]; want != "" && !strings.Contains(text, want) {
			t.Errorf("does not use %s:\n%s\nplan:\n%s", want, q, text)
		}
		checked++
	}
	if checked < 15 {
		t.Errorf("%d statements checked, want the deliveries' (15 or more)", checked)
	}
}

// nParams is the number of parameters of q: the highest ?N, or the ?s.
func nParams(q string) int {
	n := 0
	for _, m := range regexp.MustCompile(`\?(\d+)`).FindAllStringSubmatch(q, -1) {
		v, _ := strconv.Atoi(m[1])
		n = max(n, v)
	}
	if n > 0 {
		return n
	}
	return strings.Count(q, "?")
}
