package open

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// looseModes lists the data directory and the files in it that group or
// others may access: the store holds every stored message and the
// devices' password hashes. New ones are created 0700 and 0600 whatever
// the umask; existing ones are the operator's to tighten (a backup group
// may be deliberate), so serve only warns.
func looseModes(dir string) []string {
	var loose []string
	check := func(path string, mode fs.FileMode) {
		if mode.Perm()&0o077 != 0 {
			loose = append(loose, fmt.Sprintf("%s %#o", path, mode.Perm()))
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil
	}
	check(dir, fi.Mode())
	ents, err := os.ReadDir(dir)
	if err != nil {
		return loose
	}
	for _, e := range ents {
		if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
			check(filepath.Join(dir, e.Name()), info.Mode())
		}
	}
	return loose
}
