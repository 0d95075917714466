package postgres

import (
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"
)

// conninfoMask replaces passwords in a shown conninfo.
const conninfoMask = "********"

// MaskConninfo returns a PostgreSQL connection string with the values of its
// password and sslpassword settings masked, for --check-config and logs.
// It follows pgx's grammar for both forms (URL and keyword/value) without
// judging validity; FuzzMaskConninfo checks against pgx's parser that the
// result means the same connection with the password masked.
func MaskConninfo(conninfo string) string {
	for _, prefix := range []string{"postgresql://", "postgres://"} {
		if rest, ok := strings.CutPrefix(conninfo, prefix); ok {
			return prefix + maskURLRest(rest)
		}
	}
	return maskKeywordValue(conninfo)
}

func isPasswordKey(k string) bool {
	return strings.EqualFold(k, "password") || strings.EqualFold(k, "sslpassword")
}

// maskURLRest masks the part of a postgres:// URL after the scheme.
func maskURLRest(p string) string {
	var b strings.Builder
	// Userinfo: whatever precedes an '@' met before any '/' (as libpq
	// reads it, so "u:p?x@h" has the password "p?x").
	if i := strings.IndexAny(p, "@/"); i >= 0 && p[i] == '@' {
		user, pw, hasPassword := strings.Cut(p[:i], ":")
		b.WriteString(user)
		if hasPassword {
			b.WriteByte(':')
			if pw != "" {
				b.WriteString(conninfoMask)
			}
		}
		b.WriteByte('@')
		p = p[i+1:]
	}
	q := urlQueryStart(p)
	if q < 0 {
		b.WriteString(p)
		return b.String()
	}
	b.WriteString(p[:q+1])
	for i, pair := range strings.Split(p[q+1:], "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		key, v, hasValue := strings.Cut(pair, "=")
		if hasValue && v != "" && isPasswordKey(percentDecode(strings.TrimSpace(key))) {
			b.WriteString(key + "=" + conninfoMask)
			continue
		}
		b.WriteString(pair)
	}
	return b.String()
}

// urlQueryStart is the index of the '?' that starts the query of a URL
// without scheme and userinfo, or -1: hosts (bracketed IPv6 literals may
// hold anything) and ports end at '/', '?' or ',', the path at '?'.
func urlQueryStart(p string) int {
	i := 0
	for {
		if i < len(p) && p[i] == '[' {
			end := strings.IndexByte(p[i:], ']')
			if end < 0 {
				return strings.IndexByte(p, '?')
			}
			i += end + 1
		}
		for i < len(p) && p[i] != '/' && p[i] != '?' && p[i] != ',' {
			i++
		}
		if i < len(p) && p[i] == ',' {
			i++
			continue
		}
		break
	}
	if j := strings.IndexByte(p[i:], '?'); j >= 0 {
		return i + j
	}
	return -1
}

// percentDecode decodes %XX escapes and leaves malformed ones as they are.
func percentDecode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if hi, lo := hexValue(s[i+1]), hexValue(s[i+2]); hi >= 0 && lo >= 0 {
				b.WriteByte(byte(hi<<4 | lo))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func hexValue(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'
}

// maskKeywordValue masks the "key = value" form: values are a run of
// non-space characters or 'single-quoted', with backslash escapes in both.
func maskKeywordValue(s string) string {
	var b strings.Builder
	for {
		i := 0
		for i < len(s) && isSpace(s[i]) {
			i++
		}
		b.WriteString(s[:i])
		s = s[i:]
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			b.WriteString(s) // no setting left (or not a valid one)
			return b.String()
		}
		key := strings.TrimFunc(s[:eq], func(r rune) bool { return r < 0x80 && isSpace(byte(r)) })
		b.WriteString(s[:eq+1])
		s = s[eq+1:]
		i = 0
		for i < len(s) && isSpace(s[i]) {
			i++
		}
		b.WriteString(s[:i])
		s = s[i:]
		end := valueEnd(s)
		if isPasswordKey(key) && end > 0 {
			b.WriteString(conninfoMask)
		} else {
			b.WriteString(s[:end])
		}
		s = s[end:]
	}
}

// valueEnd is the length of the keyword/value value at the start of s.
func valueEnd(s string) int {
	if s == "" {
		return 0
	}
	if s[0] == '\'' {
		for i := 1; i < len(s); i++ {
			switch s[i] {
			case '\\':
				i++
			case '\'':
				return i + 1
			}
		}
		return len(s) // unterminated: all of it
	}
	i := 0
	for i < len(s) && !isSpace(s[i]) {
		if s[i] == '\\' {
			i++
		}
		i++
	}
	return min(i, len(s))
}

// CheckConninfo reports whether conninfo is a connection string Open
// accepts, without connecting; pgx's message masks the password.
func CheckConninfo(conninfo string) error {
	_, err := pgxpool.ParseConfig(conninfo)
	return err
}
