package main

import (
	"regexp"
	"strings"
	"testing"
)

// The command list of "emsdp -h" names every subcommand that the
// command's own usage line offers ("emsdp device add|list|...").
func TestUsageNamesSubcommands(t *testing.T) {
	code, out, errb := runCmd(t, "", "-h")
	top := out + errb
	if code != exitOK {
		t.Fatalf("emsdp -h: exit %d", code)
	}
	subRE := regexp.MustCompile(`usage: emsdp \S+ ([a-z-]+(?:\|[a-z-]+)+)`)
	for _, c := range commands() {
		line := ""
		for l := range strings.Lines(top) {
			if f := strings.Fields(l); len(f) > 0 && f[0] == c.name {
				line = l
			}
		}
		if line == "" {
			t.Errorf("emsdp -h does not list %q", c.name)
			continue
		}
		_, o, e := runCmd(t, "", c.name, "-h")
		usage := o + e
		m := subRE.FindStringSubmatch(usage)
		if m == nil {
			continue // no subcommands
		}
		for _, sub := range strings.Split(m[1], "|") {
			if !regexp.MustCompile(`\b` + sub + `\b`).MatchString(line) {
				t.Errorf("emsdp -h, line of %q, does not name its subcommand %q: %q", c.name, sub, strings.TrimSpace(line))
			}
		}
	}
}
