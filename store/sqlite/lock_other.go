//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package sqlite

// LockFile is the file in a data directory that Options.Lock locks.
const LockFile = "serve.lock"

// lockDir is a no-op where flock is not available.
func lockDir(string) (func(), error) { return func() {}, nil }
