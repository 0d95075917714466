package ua

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// DeliveredIndexName is the file in a Maildir's root where Maildir keeps
// the fingerprints of the deliveries it stored. It has no leading dot:
// Maildir++ readers take dot names in the root for folders (Dovecot keeps
// its dovecot-uidlist there the same way).
const DeliveredIndexName = "emsdp-delivered"

// Defaults of MaildirConfig.
const (
	DefaultDeliveredRetention = 30 * 24 * time.Hour
	DefaultDeliveredMax       = 10000
)

// compactSlack is how many dead lines (expired, superseded, damaged) the
// index file may hold beyond as many as it has live ones before it is
// rewritten: at most 2×max+compactSlack lines, and a rewrite at most once
// per max(live, compactSlack) appends.
const compactSlack = 64

// deliveredIndex is the set of fingerprints of stored deliveries, kept in
// an append-only text file of lines "<fingerprint hex> <unix seconds>\n".
// The file is the truth: each Store first re-reads it when another process
// changed it since (a stat per delivery), so that processes sharing a
// Maildir see each other's entries. Not safe for concurrent use; Maildir
// serialises it.
type deliveredIndex struct {
	path      string
	retention time.Duration
	max       int
	log       *slog.Logger

	seen  map[Fingerprint]int64 // live fingerprints → latest record time
	order []indexEntry          // valid lines in file order; some may be superseded
	lines int                   // lines in the file, valid or not
	torn  bool                  // the file does not end in '\n' (a crash mid-append)

	// file and size are the file as last read or written by us: when the
	// file on disk differs, someone else wrote or compacted it.
	file fs.FileInfo
	size int64

	dirSynced     bool // the root directory was synced after an append of ours
	warned        bool // damaged lines were reported once
	compactBefore int  // after a failed compaction, no retry before this many lines
}

type indexEntry struct {
	fp Fingerprint
	t  int64
}

func newDeliveredIndex(dir string, retention time.Duration, max int, log *slog.Logger) *deliveredIndex {
	return &deliveredIndex{path: filepath.Join(dir, DeliveredIndexName), retention: retention, max: max, log: log,
		seen: map[Fingerprint]int64{}}
}

// refresh re-reads the file if it is not as we left it. Errors are logged:
// the index only spares duplicates, and a delivery must never fail for it.
func (x *deliveredIndex) refresh(now time.Time) {
	fi, err := os.Stat(x.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if x.file != nil { // removed by hand: start afresh
			x.reset()
		}
		return
	case err != nil:
		x.log.Warn("ua: maildir: reading the delivered-message index", "err", err)
		return
	case x.unchanged(fi):
		x.prune(now)
		return
	}
	if err := x.load(now); err != nil {
		x.log.Warn("ua: maildir: reading the delivered-message index", "err", err)
	}
}

// unchanged reports whether fi is the file as we last read or wrote it.
// The modification time guards against an inode number reused by a new
// file of the same size.
func (x *deliveredIndex) unchanged(fi fs.FileInfo) bool {
	return x.file != nil && os.SameFile(x.file, fi) && fi.Size() == x.size && fi.ModTime().Equal(x.file.ModTime())
}

func (x *deliveredIndex) reset() {
	clear(x.seen)
	x.order = x.order[:0]
	x.lines, x.torn, x.file, x.size = 0, false, nil, 0
}

// load reads the whole file, skipping damaged lines, then drops what is
// past retention and compacts when worthwhile. When reading fails, what
// was known stays.
func (x *deliveredIndex) load(now time.Time) error {
	f, err := os.Open(x.path)
	if errors.Is(err, fs.ErrNotExist) {
		x.reset()
		return nil
	}
	if err != nil {
		return fmt.Errorf("ua: maildir: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("ua: maildir: %w", err)
	}
	n := &deliveredIndex{path: x.path, retention: x.retention, max: x.max, log: x.log, seen: map[Fingerprint]int64{},
		dirSynced: x.dirSynced, warned: x.warned, compactBefore: x.compactBefore}
	// Lines are read one at a time (a long one is damage and is skipped,
	// not buffered), so that a huge or garbage file costs no more memory
	// than its live entries.
	r := bufio.NewReaderSize(f, 4096)
	bad, firstBad := 0, 0
	long := false // inside a line longer than the buffer
	for {
		line, err := r.ReadSlice('\n')
		n.size += int64(len(line))
		if errors.Is(err, bufio.ErrBufferFull) {
			long = true
			continue
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("ua: maildir: %w", err)
		}
		if len(line) > 0 || long {
			n.lines++
			terminated := len(line) > 0 && line[len(line)-1] == '\n'
			if fp, t, ok := parseIndexLine(line); ok && terminated && !long {
				n.put(fp, t)
			} else {
				// An unterminated last line is an append cut short by a
				// crash: the next append starts on a new line.
				n.torn = !terminated
				if bad++; bad == 1 {
					firstBad = n.lines
				}
			}
			long = false
		}
		if err != nil { // EOF
			break
		}
		if len(n.order) >= 2*n.max {
			n.trim(len(n.order) - n.max) // bound memory on a huge file
		}
	}
	n.file = fi
	if bad > 0 {
		lv := slog.LevelDebug
		if !n.warned {
			lv, n.warned = slog.LevelWarn, true
		}
		n.log.Log(context.Background(), lv, "ua: maildir: skipping damaged lines of the delivered-message index",
			"path", n.path, "lines", bad, "first", firstBad)
	}
	*x = *n
	x.prune(now)
	x.maybeCompact()
	return nil
}

// put records fp as stored at t.
func (x *deliveredIndex) put(fp Fingerprint, t int64) {
	x.seen[fp] = t
	x.order = append(x.order, indexEntry{fp, t})
}

// trim forgets the n oldest entries.
func (x *deliveredIndex) trim(n int) {
	for _, e := range x.order[:n] {
		if x.seen[e.fp] == e.t { // not superseded by a later line
			delete(x.seen, e.fp)
		}
	}
	x.order = append(x.order[:0], x.order[n:]...)
}

// prune forgets entries past retention, and the oldest beyond max.
func (x *deliveredIndex) prune(now time.Time) {
	cutoff := now.Add(-x.retention).Unix()
	n := 0
	for n < len(x.order) && (len(x.order)-n > x.max || x.order[n].t < cutoff) {
		n++
	}
	if n > 0 {
		x.trim(n)
	}
}

func (x *deliveredIndex) contains(fp Fingerprint) bool {
	_, ok := x.seen[fp]
	return ok
}

// add records fp durably: appended and synced, with the directory synced
// when the file may be new, so that it survives a crash too. When writing
// fails fp is still remembered, until the file is next re-read, so that
// this process at least recognises a re-delivery.
func (x *deliveredIndex) add(fp Fingerprint, now time.Time) error {
	line := appendIndexLine(nil, fp, now.Unix())
	if x.torn {
		line = append([]byte{'\n'}, line...)
	}
	// A file we did not know may be new: its name must be made durable.
	dirSync := !x.dirSynced || x.file == nil
	x.put(fp, now.Unix())
	x.prune(now)
	f, err := os.OpenFile(x.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		x.file = nil // re-read what is there at the next refresh
		return fmt.Errorf("ua: maildir: delivered-message index: %w", err)
	}
	_, err = f.Write(line)
	if err == nil {
		err = f.Sync()
	}
	fi, serr := f.Stat()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && dirSync {
		err = syncDir(filepath.Dir(x.path))
		x.dirSynced = err == nil
	}
	if err != nil {
		x.file = nil
		return fmt.Errorf("ua: maildir: delivered-message index: %w", err)
	}
	x.lines++
	x.torn = false
	// Only our line was added: the file is still as we know it.
	if serr == nil && fi.Size() == x.size+int64(len(line)) && (x.file == nil && x.size == 0 || x.file != nil && os.SameFile(x.file, fi)) {
		x.file, x.size = fi, fi.Size()
	} else {
		x.file = nil
	}
	x.maybeCompact()
	return nil
}

// maybeCompact rewrites the file with the live entries when dead lines
// outnumber them (and compactSlack). A failure is logged: the file as it
// is stays valid.
func (x *deliveredIndex) maybeCompact() {
	if dead := x.lines - len(x.seen); dead <= max(len(x.seen), compactSlack) || x.lines < x.compactBefore {
		return
	}
	if err := x.compact(); err != nil {
		x.compactBefore = 2 * x.lines
		x.log.Warn("ua: maildir: compacting the delivered-message index", "err", err)
	}
}

// compact writes the live entries to a new file, syncs it and renames it
// over the index, so that a crash leaves either file whole. An entry
// another process appends between our last read and the rename is lost
// from the file: a re-delivery of that message would be stored again.
func (x *deliveredIndex) compact() error {
	dir := filepath.Dir(x.path)
	removeStaleTemps(dir, time.Now())
	tmp, err := os.CreateTemp(dir, DeliveredIndexName+".tmp*")
	if err != nil {
		return fmt.Errorf("ua: maildir: %w", err)
	}
	live := make([]indexEntry, 0, len(x.seen))
	written := make(map[Fingerprint]bool, len(x.seen))
	var b []byte
	for _, e := range x.order {
		if x.seen[e.fp] == e.t && !written[e.fp] {
			written[e.fp] = true
			live = append(live, e)
			b = appendIndexLine(b, e.fp, e.t)
		}
	}
	_, err = tmp.Write(b)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), x.path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("ua: maildir: %w", err)
	}
	x.order, x.lines, x.torn, x.compactBefore = live, len(live), false, 0
	x.file = nil
	if fi, err := os.Stat(x.path); err == nil && fi.Size() == int64(len(b)) {
		x.file, x.size = fi, fi.Size()
	}
	// The rename is durable only once the directory is.
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("ua: maildir: %w", err)
	}
	return nil
}

// staleTempAge: a compaction's temporary file this old was left by a
// crash; a younger one may be another process's compaction under way.
const staleTempAge = time.Hour

// removeStaleTemps removes the temporary files of compactions that a crash
// cut short, so that they do not pile up in the Maildir's root.
func removeStaleTemps(dir string, now time.Time) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), DeliveredIndexName+".tmp") || !e.Type().IsRegular() {
			continue
		}
		if fi, err := e.Info(); err == nil && now.Sub(fi.ModTime()) > staleTempAge {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// appendIndexLine appends the index line for fp recorded at t.
func appendIndexLine(b []byte, fp Fingerprint, t int64) []byte {
	b = hex.AppendEncode(b, fp[:])
	b = append(b, ' ')
	b = strconv.AppendInt(b, t, 10)
	return append(b, '\n')
}

// parseIndexLine parses one index line, with or without its '\n'; it
// accepts exactly what appendIndexLine writes.
func parseIndexLine(line []byte) (fp Fingerprint, t int64, ok bool) {
	line = bytes.TrimSuffix(line, []byte{'\n'})
	h, ts, found := bytes.Cut(line, []byte{' '})
	if !found || len(h) != 2*len(fp) || len(ts) == 0 || len(ts) > 20 {
		return fp, 0, false
	}
	for _, c := range h {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fp, 0, false
		}
	}
	if _, err := hex.Decode(fp[:], h); err != nil {
		return fp, 0, false
	}
	t, err := strconv.ParseInt(string(ts), 10, 64)
	if err != nil || strconv.FormatInt(t, 10) != string(ts) {
		return Fingerprint{}, 0, false
	}
	return fp, t, true
}
