package ua

import (
	"testing"
	"testing/synctest"

	"github.com/esro-emsdp/emsdp/emsd"
)

// Regressions found running the client against the C reference MTS.

// The reference MTS sends instance id 0 on every delivery and every
// segment (§1.5). With the duplicate window on (Config.NoDuplicateWindow
// forgotten, as with `emsdp ua receive` without --reference-mts) its
// deliveries must still all arrive: they differ, so none is a
// re-invocation. (The client once answered RESULT to the second and later
// ones and dropped them: two of three messages lost in the interop run,
// and no segmented message could complete.) A true repeat is still caught,
// see TestCaptureDuplicateInstance.
func TestReferenceMTSWithWindowOn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mts, d := captureDevice(t, "127.0.0.11:2002", Config{})
		sections := []string{"emsd-deliver-3way", "emsd-deliver-multi-recipient", "emsd-deliver-segmented-3way",
			"emsd-deliver-report-lf-becomes-ipm"}
		for _, s := range sections {
			replay(t, mts, s)
		}
		got := d.rec.deliveries()
		if len(got) != len(sections) {
			t.Fatalf("%d deliveries, want %d", len(got), len(sections))
		}
		for i, id := range []string{"<in3way.20261126@example.com>", "<multi.20261126@example.com>"} {
			if got[i].MessageID != emsd.RFC822ID(id) {
				t.Errorf("delivery %d: %s, want %s", i, got[i].MessageID, id)
			}
		}
		checkLong(t, got[2:3])
	})
}
