package mailconv

import (
	"bytes"
	"encoding/base64"
	"mime"
	"mime/quotedprintable"
	"strings"
	"unicode/utf8"

	"github.com/esro-emsdp/emsdp/emsd"
)

// mime writes the MIME fields and returns the body to send. Text bodies
// (no content type, or text/*) are sent as UTF-8 with 7bit when every line
// allows it and quoted-printable otherwise; a body the IPM declares as
// already encoded (quoted-printable, base64) or as non-text (multipart, ...)
// is passed through with its declared fields, as the reference does.
func (f *formatter) mime(h *emsd.Heading, body []byte) []byte {
	ct := oneLine(h.MIMEContentType)
	cte := strings.ToLower(oneLine(h.MIMEContentTransferEncoding))
	mt, params, err := mime.ParseMediaType(ct)
	if ct == "" || err != nil || !IsASCII(ct) {
		mt, params = "text/plain", map[string]string{}
	}
	version := oneLine(h.MIMEVersion)
	if version == "" || !IsASCII(version) {
		version = "1.0"
	}
	idDesc := func() {
		if id := oneLine(h.MIMEContentID); id != "" && IsASCII(id) {
			f.field("Content-ID", id)
		}
		if d := oneLine(h.MIMEContentDescription); d != "" {
			f.field("Content-Description", encodeText(d))
		}
	}
	passthrough := ct != "" && err == nil && IsASCII(ct) &&
		(!strings.HasPrefix(mt, "text/") || cte == "quoted-printable" || cte == "base64")
	if passthrough {
		f.field("MIME-Version", version)
		f.field("Content-Type", ct)
		// A single non-text entity in raw octets that SMTP lines cannot
		// carry is base64-encoded (its decoded content is unchanged);
		// multipart bodies and declared encodings are the device's own.
		raw := cte == "" || cte == "7bit" || cte == "8bit" || cte == "binary"
		if raw && !strings.HasPrefix(mt, "multipart/") && !strings.HasPrefix(mt, "message/") && !lineSafe(body) {
			f.field("Content-Transfer-Encoding", "base64")
			idDesc()
			return base64Lines(body)
		}
		if cte != "" && validLabel(cte) {
			f.field("Content-Transfer-Encoding", cte)
		}
		idDesc()
		return crlf(body)
	}
	text := bytes.ReplaceAll(body, []byte("\r"), nil) // §9.6: all CR removed
	cs := strings.ToLower(params["charset"])
	// Octets declared in another charset keep that charset; everything else
	// is sent as UTF-8.
	if otherCharset := !utf8.Valid(text) && cs != "" && cs != "utf-8" && cs != "utf8" && cs != "us-ascii"; !otherCharset {
		text, _ = validUTF8(text, cs == "utf-8" || cs == "utf8")
		switch {
		case !IsASCII(string(text)):
			params["charset"] = "utf-8"
		case cs == "":
			params["charset"] = "us-ascii"
		}
	}
	sevenBit := lineSafe(text)
	if sevenBit && ct == "" && h.MIMEVersion == "" && cte == "" && h.MIMEContentID == "" && h.MIMEContentDescription == "" {
		// Plain ASCII mail without MIME, as the reference writes it.
		return crlf(text)
	}
	f.field("MIME-Version", version)
	f.field("Content-Type", mime.FormatMediaType(mt, params))
	if sevenBit {
		f.field("Content-Transfer-Encoding", "7bit")
		idDesc()
		return crlf(text)
	}
	f.field("Content-Transfer-Encoding", "quoted-printable")
	idDesc()
	var b bytes.Buffer
	w := quotedprintable.NewWriter(&b)
	w.Write(text)
	w.Close()
	return crlf(b.Bytes())
}

// crlf converts line ends to CRLF and ends the text with one.
func crlf(b []byte) []byte {
	b = toLF(b)
	out := make([]byte, 0, len(b)+len(b)/32+2)
	for _, c := range b {
		if c == '\n' {
			out = append(out, '\r')
		}
		out = append(out, c)
	}
	if len(out) > 0 && !bytes.HasSuffix(out, []byte("\r\n")) {
		out = append(out, '\r', '\n')
	}
	return out
}

// lineSafe: 7-bit text without NUL or CR whose lines fit SMTP's 998 octets.
func lineSafe(b []byte) bool {
	if !IsASCII(string(b)) || bytes.IndexByte(b, 0) >= 0 || bytes.IndexByte(b, '\r') >= 0 {
		return false
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if len(line) > 998 {
			return false
		}
	}
	return true
}

// base64Lines encodes b in CRLF-terminated lines of 76 characters.
func base64Lines(b []byte) []byte {
	enc := base64.StdEncoding.EncodeToString(b)
	out := make([]byte, 0, len(enc)+len(enc)/76*2+2)
	for len(enc) > 76 {
		out = append(out, enc[:76]...)
		out = append(out, '\r', '\n')
		enc = enc[76:]
	}
	out = append(out, enc...)
	return append(out, '\r', '\n')
}
