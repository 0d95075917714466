package mailconv

import (
	"bytes"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/html"
	"golang.org/x/text/encoding/charmap"
)

// cutUTF8 returns the longest prefix of s that is at most max octets and
// does not split a UTF-8 sequence (§5 limits count octets, OP 8).
func cutUTF8(s string, max int) string {
	if len(s) <= max {
		return s
	}
	if max <= 0 {
		return ""
	}
	i := max
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	// s[i] starts a rune that does not fit completely; drop it.
	return s[:i]
}

// cutUTF8Bytes is cutUTF8 for byte slices.
func cutUTF8Bytes(b []byte, max int) []byte {
	if len(b) <= max {
		return b
	}
	if max <= 0 {
		return b[:0]
	}
	i := max
	for i > 0 && !utf8.RuneStart(b[i]) {
		i--
	}
	return b[:i]
}

// oneLine makes s valid UTF-8 on one line: control characters (CR, LF and
// TAB included) become blanks, runs of blanks collapse, ends are trimmed.
// Header-derived EMSD strings go through it so that FormatIPM never has to
// deal with embedded line breaks from this side.
func oneLine(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	var b strings.Builder
	b.Grow(len(s))
	space := false
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == ' ' || (r >= 0x80 && r < 0xa0) || r == '\u2028' || r == '\u2029' {
			space = true
			continue
		}
		if space && b.Len() > 0 {
			b.WriteByte(' ')
		}
		space = false
		b.WriteRune(r)
	}
	return b.String()
}

// IsASCII reports whether s has only 7-bit octets.
func IsASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// toLF turns CRLF and lone CR into LF (bodies are delivered with LF ends,
// §3 notes).
func toLF(b []byte) []byte {
	if bytes.IndexByte(b, '\r') < 0 {
		return b
	}
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c == '\r' {
			if i+1 < len(b) && b[i+1] == '\n' {
				continue
			}
			c = '\n'
		}
		out = append(out, c)
	}
	return out
}

// validUTF8 returns b as valid UTF-8. Undeclared 8-bit text is far more often
// Windows-1252/ISO-8859-1 than anything else, so a body that is not UTF-8 and
// had no usable charset is read as Windows-1252; guessed reports whether that
// happened. With declared (but broken) UTF-8, invalid octets become U+FFFD.
func validUTF8(b []byte, declaredUTF8 bool) (out []byte, guessed bool) {
	if utf8.Valid(b) {
		return b, false
	}
	if !declaredUTF8 {
		if d, err := charmap.Windows1252.NewDecoder().Bytes(b); err == nil && utf8.Valid(d) {
			return d, true
		}
	}
	return bytes.ToValidUTF8(b, []byte("\uFFFD")), false
}

// htmlToText renders HTML as plain text for a device display: text content
// with block elements on their own lines, links followed by their target,
// scripts and styles dropped, entities decoded, blank runs collapsed.
func htmlToText(src []byte) []byte {
	z := html.NewTokenizer(bytes.NewReader(src))
	var out bytes.Buffer
	skip := 0         // depth inside script/style/head
	pendingNL := 0    // newlines owed before the next text
	lastSpace := true // the output ends in white space
	var href []string // stack of link targets
	newline := func(n int) {
		if out.Len() > 0 && n > pendingNL {
			pendingNL = n
		}
	}
	write := func(s string) {
		if s == "" {
			return
		}
		if pendingNL > 0 {
			for range pendingNL {
				out.WriteByte('\n')
			}
			pendingNL = 0
			lastSpace = true
		}
		out.WriteString(s)
		lastSpace = strings.HasSuffix(s, " ")
	}
	for {
		tt := z.Next()
		switch tt {
		case html.ErrorToken:
			return bytes.TrimSpace(out.Bytes())
		case html.TextToken:
			if skip > 0 {
				continue
			}
			t := string(z.Text())
			// Collapse white space as a browser does.
			var b strings.Builder
			sp := lastSpace && pendingNL == 0 || pendingNL > 0
			for _, r := range t {
				if unicode.IsSpace(r) {
					if !sp {
						b.WriteByte(' ')
						sp = true
					}
					continue
				}
				sp = false
				b.WriteRune(r)
			}
			write(b.String())
		case html.StartTagToken, html.EndTagToken, html.SelfClosingTagToken:
			name, hasAttr := z.TagName()
			tag := string(name)
			end := tt == html.EndTagToken
			switch tag {
			case "script", "style", "head", "title", "template":
				if tt == html.StartTagToken {
					skip++
				} else if end && skip > 0 {
					skip--
				}
			case "br":
				if pendingNL == 0 {
					out.WriteByte('\n')
					lastSpace = true
				} else {
					pendingNL++
				}
			case "p", "div", "table", "ul", "ol", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "hr":
				newline(2)
			case "tr", "li", "dt", "dd":
				newline(1)
				if tag == "li" && !end {
					write("- ")
				}
			case "td", "th":
				if !end && !lastSpace {
					write(" ")
				}
			case "a":
				if end {
					if n := len(href); n > 0 {
						if h := href[n-1]; h != "" && !strings.HasPrefix(h, "#") && !strings.HasPrefix(h, "mailto:") {
							write(" <" + h + ">")
						}
						href = href[:n-1]
					}
				} else if tt == html.StartTagToken {
					target := ""
					for hasAttr {
						var k, v []byte
						k, v, hasAttr = z.TagAttr()
						if string(k) == "href" {
							target = strings.TrimSpace(string(v))
						}
					}
					if len(href) < 64 {
						href = append(href, target)
					}
				}
			}
		}
	}
}

// HeaderSection returns the header of msg (up to the first empty line).
func HeaderSection(msg []byte) []byte {
	if i := bytes.Index(msg, []byte("\r\n\r\n")); i >= 0 {
		return msg[:i]
	}
	if i := bytes.Index(msg, []byte("\n\n")); i >= 0 {
		return msg[:i]
	}
	return msg
}
