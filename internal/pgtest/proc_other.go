//go:build !unix

package pgtest

import (
	"context"
	"errors"
	"os/exec"
)

// serverCred names the user the server would run as; on these systems
// the server always runs as the tests' own user.
type serverCred struct{ Uid, Gid uint32 }

// serverUser is only asked for when the tests run as root, which these
// systems do not have.
func serverUser(context.Context) (*serverCred, error) {
	return nil, errors.New("pgtest: a server user can only be chosen on Unix systems")
}

func runAs(*exec.Cmd, *serverCred) {}

// detach is a no-op: ^C reaches the watchdog too, which then stops the
// server a little earlier.
func detach(*exec.Cmd) {}
