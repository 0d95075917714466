// Package captures gives tests the datagrams that the C reference's programs
// exchanged on loopback (reference-captures.txt, copied from the project's
// shared test data).
package captures

import (
	_ "embed"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

//go:embed reference-captures.txt
var raw string

// Datagram is one captured UDP payload.
type Datagram struct {
	Offset   float64 // seconds since the section's first datagram
	From, To string  // "2003" or "127.0.0.10:2002" as written in the file
	Payload  []byte
}

// Section is one "## name" block of the capture file.
type Section struct {
	Name      string
	Comments  []string // the '#' lines under the name
	Datagrams []Datagram
}

// All parses the embedded capture file. It panics on a malformed file, which
// is a broken test fixture, not an input error.
func All() []Section {
	s, err := Parse(raw)
	if err != nil {
		panic(err)
	}
	return s
}

// Get returns the named section or panics.
func Get(name string) Section {
	for _, s := range All() {
		if s.Name == name {
			return s
		}
	}
	panic("captures: no section " + name)
}

// Parse reads the capture file format: '## name' starts a section, '#' lines
// are comments, and each datagram line is '+seconds  from->to  hex octets'.
func Parse(text string) ([]Section, error) {
	var out []Section
	for n, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "":
		case strings.HasPrefix(line, "## "):
			out = append(out, Section{Name: strings.TrimSpace(line[3:])})
		case strings.HasPrefix(line, "#"):
			if len(out) > 0 {
				out[len(out)-1].Comments = append(out[len(out)-1].Comments, strings.TrimSpace(strings.TrimLeft(line, "#")))
			}
		default:
			if len(out) == 0 {
				return nil, fmt.Errorf("captures: line %d: datagram before any section", n+1)
			}
			f := strings.Fields(line)
			if len(f) < 3 || !strings.HasPrefix(f[0], "+") {
				return nil, fmt.Errorf("captures: line %d: malformed", n+1)
			}
			off, err := strconv.ParseFloat(f[0][1:], 64)
			if err != nil {
				return nil, fmt.Errorf("captures: line %d: %w", n+1, err)
			}
			from, to, ok := strings.Cut(f[1], "->")
			if !ok {
				return nil, fmt.Errorf("captures: line %d: no from->to", n+1)
			}
			payload, err := hex.DecodeString(strings.Join(f[2:], ""))
			if err != nil {
				return nil, fmt.Errorf("captures: line %d: %w", n+1, err)
			}
			s := &out[len(out)-1]
			s.Datagrams = append(s.Datagrams, Datagram{Offset: off, From: from, To: to, Payload: payload})
		}
	}
	return out, nil
}
