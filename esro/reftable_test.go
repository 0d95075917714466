package esro

import (
	"math/rand/v2"
	"testing"
)

// refTable must agree with a map through growth past its inline slots,
// deletions in any order and emptying, from which it starts small again.
func TestRefTable(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, size := range []int{1, 4, 5, 40, 256} {
		var tb refTable
		want := map[uint8]*invocation{}
		for round := range 3 {
			for _, r := range rng.Perm(256)[:size] {
				inv := &invocation{key: invKey{ref: uint8(r)}}
				tb.put(inv)
				want[uint8(r)] = inv
			}
			check := func() {
				t.Helper()
				for r := range 256 {
					if got := tb.get(uint8(r)); got != want[uint8(r)] {
						t.Fatalf("size %d round %d: get(%d) = %v, want %v", size, round, r, got, want[uint8(r)])
					}
				}
				n := 0
				tb.each(func(inv *invocation) {
					n++
					if want[inv.key.ref] != inv {
						t.Fatalf("each gave %d, not in the table", inv.key.ref)
					}
				})
				if n != len(want) || tb.n != len(want) {
					t.Fatalf("size %d: each %d, n %d, want %d", size, n, tb.n, len(want))
				}
			}
			check()
			for r, inv := range want {
				if rng.IntN(2) == 0 {
					tb.del(inv)
					delete(want, r)
				}
			}
			check()
			for r, inv := range want {
				tb.del(inv)
				delete(want, r)
			}
			check()
			if tb.all != nil {
				t.Fatalf("size %d: empty table keeps its array", size)
			}
		}
	}
}
