package postgres

import (
	"maps"
	"os"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestMaskConninfo(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"host=/run/postgresql dbname=emsdp", "host=/run/postgresql dbname=emsdp"},
		{"host=db password=secret dbname=emsdp", "host=db password=******** dbname=emsdp"},
		{"password = 'se cret\\' x' host=db", "password = ******** host=db"},
		{"password=a\\ b host=db", "password=******** host=db"},
		{"password= host=db", "password= ********"}, // libpq: the value is "host=db"
		{"password='' host=db", "password=******** host=db"},
		{"sslpassword=k password=p", "sslpassword=******** password=********"},
		{"password='unterminated host=db", "password=********"},
		{"postgres://u:secret@db:5432/emsdp?sslmode=require", "postgres://u:********@db:5432/emsdp?sslmode=require"},
		{"postgresql://u@db/emsdp", "postgresql://u@db/emsdp"},
		{"postgres://u:@db/emsdp", "postgres://u:@db/emsdp"},
		{"postgres://u:p?x@db/emsdp", "postgres://u:********@db/emsdp"}, // libpq reads userinfo up to '@'
		{"postgres://db/emsdp?user=u&password=secret&sslpassword=k", "postgres://db/emsdp?user=u&password=********&sslpassword=********"},
		{"postgres://db/emsdp?pass%77ord=secret", "postgres://db/emsdp?pass%77ord=********"},
		{"postgres://[::1]:5432,h2/emsdp?password=x", "postgres://[::1]:5432,h2/emsdp?password=********"},
		{"postgres://h1,h2?password=x", "postgres://h1,h2?password=********"},
	} {
		if got := MaskConninfo(tc.in); got != tc.want {
			t.Errorf("MaskConninfo(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// FuzzMaskConninfo: for every conninfo pgx accepts, the masked one means the same
// connection (host, port, database, user, parameters) with the password
// replaced, and masking never panics.
func FuzzMaskConninfo(f *testing.F) {
	for _, s := range []string{"host=db password=secret dbname=emsdp", "password = 'a\\'b' user=u",
		"postgres://u:secret@db:5432/emsdp?sslmode=disable", "postgres://db/emsdp?password=x&application_name=y",
		"postgresql://u:p@[::1]:5432,h2:6543/d?password=q", "host=/tmp port=5432 password=", "dbname=x Password=y"} {
		f.Add(s)
	}
	passwordInEnv := os.Getenv("PGPASSWORD") != "" || os.Getenv("PGPASSFILE") != "" || os.Getenv("PGSERVICE") != ""
	if home, err := os.UserHomeDir(); err == nil {
		if _, err := os.Stat(home + "/.pgpass"); err == nil {
			passwordInEnv = true
		}
	}
	f.Fuzz(func(t *testing.T, conninfo string) {
		masked := MaskConninfo(conninfo)
		orig, err := pgconn.ParseConfig(conninfo)
		if err != nil {
			return
		}
		got, err := pgconn.ParseConfig(masked)
		if err != nil {
			t.Fatalf("%q parses, masked %q does not: %v", conninfo, masked, err)
		}
		if got.Host != orig.Host || got.Port != orig.Port || got.Database != orig.Database || got.User != orig.User {
			t.Errorf("%q masked %q: %s:%d/%s@%s, want %s:%d/%s@%s", conninfo, masked, got.Host, got.Port, got.Database, got.User,
				orig.Host, orig.Port, orig.Database, orig.User)
		}
		params := func(c *pgconn.Config) map[string]string {
			m := maps.Clone(c.RuntimeParams)
			maps.DeleteFunc(m, func(k, _ string) bool { return isPasswordKey(k) })
			return m
		}
		if !maps.Equal(params(got), params(orig)) {
			t.Errorf("%q masked %q: parameters %v, want %v", conninfo, masked, got.RuntimeParams, orig.RuntimeParams)
		}
		if !passwordInEnv && orig.Password != "" && got.Password != conninfoMask {
			t.Errorf("%q masked %q: password %q", conninfo, masked, got.Password)
		}
	})
}
