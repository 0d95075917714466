package main

import (
	"errors"
	"flag"
	"fmt"
)

// parseFlags is the flag parsing of every subcommand. It parses fs's flags
// wherever they stand among args ("ports probe HOST --port 641", "decode
// FILE --json" read naturally) and returns the other arguments, at most
// `most` of them (most < 0: any number). -h is done with exitOK; a bad flag,
// or an argument too many, is done with exitUsage. Messages go to
// env.stderr.
func parseFlags(fs *flag.FlagSet, env *cmdEnv, args []string, most int) (pos []string, done bool, code int) {
	fs.SetOutput(env.stderr)
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, true, exitOK
			}
			return nil, true, exitUsage
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if most >= 0 && len(pos) > most {
		want := "want 0 arguments"
		if most > 0 {
			want = fmt.Sprintf("want at most %d", most)
		}
		fmt.Fprintf(env.stderr, "%s: unexpected argument %q (%s)\n", fs.Name(), pos[most], want)
		return nil, true, exitUsage
	}
	return pos, false, 0
}
