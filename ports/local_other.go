//go:build !darwin && !freebsd && !windows

package ports

import "context"

// nativeSockets is the bind test where neither /proc nor a native socket
// table is known (Linux always has /proc).
func nativeSockets(ctx context.Context, ports []int) ([]Socket, []string, error) {
	return bindTest(ctx, ports)
}
