package testport

import (
	"fmt"
	"net"
	"testing"
)

func TestQuiet(t *testing.T) {
	low := ephemeralLow()
	for range 20 {
		p := Quiet(t, "tcp", "udp")
		if p <= 0 || p >= low {
			t.Fatalf("port %d outside (0, %d)", p, low)
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Fatalf("port %d not free on tcp: %v", p, err)
		}
		l.Close()
	}
}
