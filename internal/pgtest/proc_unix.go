//go:build unix

package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"os/user"
	"strconv"
	"syscall"
)

// serverCred is the user the server runs as when the tests run as root.
type serverCred = syscall.Credential

// serverUser returns the credentials of the postgres system user,
// creating it when missing (PostgreSQL refuses to run as root).
func serverUser(ctx context.Context) (*serverCred, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		var unknown user.UnknownUserError
		if !errors.As(err, &unknown) {
			return nil, fmt.Errorf("pgtest: look up user postgres: %w", err)
		}
		out, err := exec.CommandContext(ctx, "useradd", "--system", "--user-group", "--no-create-home",
			"--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "postgres").CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("pgtest: running as root and there is no postgres user to run the server as; "+
				"useradd failed: %w\n%s", err, out)
		}
		if u, err = user.Lookup("postgres"); err != nil {
			return nil, fmt.Errorf("pgtest: look up user postgres: %w", err)
		}
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("pgtest: user postgres has non-numeric ids %s:%s", u.Uid, u.Gid)
	}
	return &serverCred{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}, nil
}

// runAs makes c run as cred (nil: as this process's user).
func runAs(c *exec.Cmd, cred *serverCred) {
	if cred == nil {
		return
	}
	if c.SysProcAttr == nil {
		c.SysProcAttr = &syscall.SysProcAttr{}
	}
	c.SysProcAttr.Credential = cred
}

// detach puts c in a process group of its own.
func detach(c *exec.Cmd) {
	if c.SysProcAttr == nil {
		c.SysProcAttr = &syscall.SysProcAttr{}
	}
	c.SysProcAttr.Setpgid = true
}
