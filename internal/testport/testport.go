// Package testport picks loopback ports for tests that must name a port
// before a program binds it (a config file, a program without port 0).
//
// A port found free by binding port 0 and closing could be handed to any
// other socket before the program binds it. The ports here lie below the
// kernel's ephemeral range (Linux's ip_local_port_range), which the
// kernel never hands to a socket bound to port 0 or to an outgoing
// connection: only another explicit bind could take one.
package testport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// ephemeralLow is the start of the kernel's ephemeral port range.
func ephemeralLow() int {
	low := 32768 // Linux's default
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 2048 {
				low = n
			}
		}
	}
	return low
}

// Quiet returns a port on 127.0.0.1 below the ephemeral range that is
// free now on each of the networks given ("tcp", "udp"); the test fails
// when 100 tries find none.
func Quiet(t testing.TB, networks ...string) int {
	t.Helper()
	low := ephemeralLow()
	for range 100 {
		port := low/2 + rand.IntN(low/2)
		if free(t, port, networks) {
			return port
		}
	}
	t.Fatalf("no port free on %v below %d", networks, low)
	return 0
}

func free(t testing.TB, port int, networks []string) bool {
	t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for _, n := range networks {
		switch n {
		case "tcp":
			l, err := net.Listen("tcp", addr)
			if err != nil {
				return false
			}
			l.Close()
		case "udp":
			u, err := net.ListenPacket("udp", addr)
			if err != nil {
				return false
			}
			u.Close()
		default:
			t.Fatalf("testport: unknown network %q", n)
		}
	}
	return true
}
