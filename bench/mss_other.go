//go:build !linux

package main

import "syscall"

// clampMSS does nothing here: only Linux is known to honour TCP_MAXSEG
// before connect, and only Linux has the segment counter the mail section
// reads, so the TCP figures are Linux-only anyway.
func clampMSS(_, _ string, _ syscall.RawConn) error { return nil }
