package ua

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/esro-emsdp/emsdp/emsd"
)

// VerifyList is the device's list of recent successful submissions, which
// answers the MTS's submission verify (§10.1, §10.4): an id found means
// "send the message", an id not found "drop it".
type VerifyList interface {
	// Add records the id the MTS returned for a submission.
	Add(id emsd.LocalMessageID) error
	// Contains reports whether id is among the recorded ones, comparing
	// UA string forms case-insensitively (§10.4).
	Contains(id emsd.MessageID) (bool, error)
}

// NewVerifyList returns an in-memory VerifyList of the n most recent ids
// (n < 1: DefaultVerifyListSize), a ring as in the reference UA (§10.1).
func NewVerifyList(n int) VerifyList {
	if n < 1 {
		n = DefaultVerifyListSize
	}
	return &memoryList{max: n}
}

type memoryList struct {
	mu  sync.Mutex
	max int
	ids []string
}

func (l *memoryList) Add(id emsd.LocalMessageID) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ids = append(l.ids, id.String())
	if len(l.ids) > l.max {
		l.ids = append(l.ids[:0], l.ids[len(l.ids)-l.max:]...)
	}
	return nil
}

func (l *memoryList) Contains(id emsd.MessageID) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return containsFold(l.ids, id.String()), nil
}

func containsFold(ids []string, s string) bool {
	for _, x := range ids {
		if strings.EqualFold(x, s) {
			return true
		}
	}
	return false
}

// NewFileVerifyList returns a VerifyList kept in a text file, one id per
// line, so that it survives restarts (the reference keeps it in
// non-volatile memory, §10.1) and can be shared by the processes of one
// device: a short-lived sender records its submissions and the long-running
// receiver answers the MTS's submission verify. Contains looks at the n
// most recent ids (n < 1: DefaultVerifyListSize). Each Add appends one line
// (O_APPEND, so concurrent writers do not overwrite each other); the file
// is compacted to its last n lines when it grows past 64 lines.
func NewFileVerifyList(path string, n int) VerifyList {
	if n < 1 {
		n = DefaultVerifyListSize
	}
	return &fileList{path: path, max: n}
}

type fileList struct {
	mu   sync.Mutex
	path string
	max  int
}

const fileListCompactAt = 64

func (l *fileList) Add(id emsd.LocalMessageID) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("ua: verify list: %w", err)
	}
	// The leading newline ends a last line left unterminated by a crash.
	_, err = f.WriteString("\n" + id.String() + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("ua: verify list: %w", err)
	}
	ids, err := l.read()
	if err != nil || len(ids) <= fileListCompactAt {
		return err
	}
	return l.compact(ids[len(ids)-l.max:])
}

// compact rewrites the file with ids through a rename, so a reader never
// sees a partial file. A line another process appends between the read and
// the rename is lost; with a 64-line threshold that needs two submissions
// within microseconds of each other, once every 60.
func (l *fileList) compact(ids []string) error {
	tmp, err := os.CreateTemp(filepath.Dir(l.path), ".verify-*")
	if err != nil {
		return fmt.Errorf("ua: verify list: %w", err)
	}
	_, err = tmp.WriteString(strings.Join(ids, "\n") + "\n")
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), l.path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("ua: verify list: %w", err)
	}
	return nil
}

func (l *fileList) read() ([]string, error) {
	b, err := os.ReadFile(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ua: verify list: %w", err)
	}
	var ids []string
	for line := range bytes.Lines(b) {
		if s := strings.TrimSpace(string(line)); s != "" {
			ids = append(ids, s)
		}
	}
	return ids, nil
}

func (l *fileList) Contains(id emsd.MessageID) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ids, err := l.read()
	if err != nil {
		return false, err
	}
	if len(ids) > l.max {
		ids = ids[len(ids)-l.max:]
	}
	return containsFold(ids, id.String()), nil
}
