//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package server

import "errors"

// ErrDataDirLocked: another server runs on the same data directory.
var ErrDataDirLocked = errors.New("data directory in use by another emsdp serve")

// lockDataDir is a no-op where flock is not available.
func lockDataDir(string) (func(), error) { return func() {}, nil }
