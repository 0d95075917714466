package mailconv

import (
	"bytes"
	"fmt"
	"io"
	"mime"
	"strings"
	"unicode/utf8"

	"github.com/emersion/go-message"

	"github.com/esro-emsdp/emsdp/emsd"
)

// maxReturnedRead is what is read of a message returned in a report
// (message/rfc822), for its header.
const maxReturnedRead = 64 << 10

// part is one MIME entity read into memory (bounded by maxTextRead per text
// leaf and maxParts/maxDepth overall).
type part struct {
	header     message.Header
	mediaType  string
	params     map[string]string
	attachment bool
	name       string
	data       []byte // text leaves: decoded to UTF-8 (see utf8OK)
	size       int64  // decoded size of a leaf
	children   []*part
	multipart  bool
	// clean: transfer encoding and charset were understood and the data is
	// valid UTF-8 as declared, nothing guessed.
	clean bool
}

func (pt *part) isText() bool {
	if pt.multipart || pt.attachment {
		return false
	}
	switch pt.mediaType {
	case "text/plain", "text/html", "text/enriched", "text/markdown", "text/x-markdown":
		return true
	case "message/delivery-status", "message/global-delivery-status", "text/rfc822-headers", "message/global-headers",
		"message/disposition-notification", "message/global-disposition-notification":
		// The machine-readable parts of a bounce or receipt (RFC 3464,
		// 6533, 8098) are text too: a device user needs the status codes
		// and the original header to know what failed.
		return true
	}
	return false
}

func (pt *part) label() string {
	name := pt.name
	if name == "" {
		name = "unnamed"
	}
	return fmt.Sprintf("%s (%s, %d octets)", oneLine(name), pt.mediaType, pt.size)
}

// readPart reads e (entErr from go-message: unknown charset or transfer
// encoding) into a part tree.
func (p *parser) readPart(e *message.Entity, entErr error, depth int, count *int) *part {
	*count++
	pt := &part{header: e.Header}
	mt, params, err := e.Header.ContentType()
	if err != nil {
		// RFC 2045 §5.2: a malformed Content-Type means text/plain; keep
		// the type itself when it is readable.
		mt, params = "text/plain", map[string]string{}
		if t, _, _ := strings.Cut(e.Header.Get("Content-Type"), ";"); strings.Count(t, "/") == 1 {
			mt = strings.ToLower(strings.TrimSpace(t))
		}
	}
	pt.mediaType, pt.params = mt, params
	if disp, dp, err := e.Header.ContentDisposition(); err == nil {
		pt.attachment = disp == "attachment"
		pt.name = dp["filename"]
	}
	if pt.name == "" {
		pt.name = params["name"]
	}
	if strings.HasPrefix(mt, "multipart/") {
		if mr := e.MultipartReader(); mr != nil && depth < maxDepth {
			pt.multipart = true
			for *count < maxParts {
				child, err := mr.NextPart()
				if err == io.EOF {
					break
				}
				if child == nil {
					p.note("MIME structure broken (%v); later parts ignored", err)
					break
				}
				pt.children = append(pt.children, p.readPart(child, err, depth+1, count))
			}
			if *count >= maxParts {
				p.note("more than %d MIME parts; later parts ignored", maxParts)
			}
			return pt
		}
		if depth >= maxDepth {
			p.note("MIME nesting deeper than %d ignored", maxDepth)
		}
	}
	limit := maxTextRead
	if !pt.isText() {
		limit = 0 // only the size matters
	}
	returned := depth > 0 && !pt.attachment && (pt.mediaType == "message/rfc822" || pt.mediaType == "message/global")
	if returned {
		limit = maxReturnedRead
	}
	data, size, err := readAll(e.Body, limit)
	pt.size = size
	if returned {
		// A bounce's returned message: its header says which message
		// failed; its body is the sender's own, and would only crowd out
		// the rest of the report on a device.
		hdr, _, _ := bytes.Cut(toLF(data), []byte("\n\n"))
		pt.mediaType = "text/rfc822-headers"
		pt.data, pt.clean = append(hdr, fmt.Sprintf("\n[returned message of %d octets: its body is not included]\n", size)...), true
		if !utf8.Valid(pt.data) {
			pt.data, _ = validUTF8(pt.data, false)
		}
		return pt
	}
	pt.clean = entErr == nil && err == nil
	if err != nil {
		p.note("%s: decoding error (%v), kept what was readable", pt.mediaType, err)
	}
	if size > int64(limit) && limit > 0 {
		p.note("%s part over %d octets, read the first %d", pt.mediaType, limit, limit)
	}
	if !pt.isText() {
		return pt
	}
	cs := strings.ToLower(params["charset"])
	if message.IsUnknownCharset(entErr) {
		p.note("unknown charset %q", cs)
	} else if message.IsUnknownEncoding(entErr) {
		p.note("unknown transfer encoding %q, body left encoded", e.Header.Get("Content-Transfer-Encoding"))
	}
	// go-message converted a known charset other than UTF-8/US-ASCII
	// already; what remains invalid is undeclared or mislabelled 8-bit text.
	declaredUTF8 := cs == "utf-8" || cs == "utf8"
	if !utf8.Valid(data) {
		pt.clean = false
	}
	out, guessed := validUTF8(data, declaredUTF8)
	if guessed {
		p.note("undeclared 8-bit text read as Windows-1252")
	}
	pt.data = out
	return pt
}

// selectText returns the parts that make the body and those left out.
func selectText(pt *part) (texts, omitted []*part) {
	switch {
	case pt.isText():
		return []*part{pt}, nil
	case !pt.multipart:
		return nil, []*part{pt}
	case pt.mediaType == "multipart/alternative":
		// Prefer text/plain, then anything else that yields text (HTML).
		best, bestScore := -1, 0
		var bestTexts, bestOmitted []*part
		for i, c := range pt.children {
			t, o := selectText(c)
			score := 0
			if len(t) > 0 {
				score = 1
				if t[0].mediaType == "text/plain" {
					score = 2
				}
			}
			if score > bestScore {
				best, bestScore, bestTexts, bestOmitted = i, score, t, o
			}
		}
		if best < 0 {
			if len(pt.children) > 0 {
				return nil, pt.children[:1]
			}
			return nil, nil
		}
		return bestTexts, bestOmitted
	case pt.mediaType == "multipart/signed":
		// The signature part is not content.
		if len(pt.children) > 0 {
			return selectText(pt.children[0])
		}
		return nil, nil
	default: // mixed, related, digest, report, ...
		for i, c := range pt.children {
			t, o := selectText(c)
			if i > 0 && pt.mediaType == "multipart/related" {
				continue // resources of the root part (inline images): presentation only
			}
			// The first part is the body; later inline texts (list footers,
			// the human part of a report) follow it; the rest is left out.
			texts = append(texts, t...)
			omitted = append(omitted, o...)
		}
		return texts, omitted
	}
}

// body chooses and decodes the text to deliver and sets the MIME fields of
// h to describe it (§9.8; the fields stay as received only when the body
// is delivered exactly as received).
func (p *parser) body(h *emsd.Heading, raw []byte) (text []byte, transformed bool) {
	top, err := message.New(p.h.Header, bytes.NewReader(raw))
	if top == nil {
		// Cannot happen with go-message's New, which always returns an
		// entity; treat the body as opaque text to be safe.
		top = &message.Entity{Header: p.h.Header, Body: bytes.NewReader(raw)}
	}
	count := 0
	root := p.readPart(top, err, 0, &count)
	texts, omitted := selectText(root)

	var out bytes.Buffer
	for _, t := range texts {
		d := t.data
		if t.mediaType == "text/html" {
			d = htmlToText(d)
		}
		d = toLF(d)
		if out.Len() > 0 && !bytes.HasSuffix(out.Bytes(), []byte("\n")) {
			out.WriteByte('\n')
		}
		if out.Len() > 0 && len(d) > 0 {
			out.WriteByte('\n')
		}
		out.Write(d)
	}
	var skipped []string
	for _, o := range omitted {
		if o.mediaType == "application/pgp-signature" || o.mediaType == "application/pkcs7-signature" ||
			o.mediaType == "application/x-pkcs7-signature" {
			continue
		}
		skipped = append(skipped, o.label())
	}
	if len(skipped) > 0 {
		p.note("parts not delivered: %s", strings.Join(skipped, ", "))
		if out.Len() > 0 && !bytes.HasSuffix(out.Bytes(), []byte("\n")) {
			out.WriteByte('\n')
		}
		if out.Len() > 0 {
			out.WriteByte('\n')
		}
		fmt.Fprintf(&out, "[Not delivered: %s]\n", strings.Join(skipped, ", "))
	}
	text = out.Bytes()

	// Verbatim only for a single text/plain entity in 7bit/8bit/binary,
	// declared UTF-8/US-ASCII (or undeclared) and matching its declaration.
	cte := strings.ToLower(strings.TrimSpace(p.h.Get("Content-Transfer-Encoding")))
	cs := strings.ToLower(root.params["charset"])
	verbatim := len(texts) == 1 && texts[0] == root && root.mediaType == "text/plain" && root.clean &&
		len(skipped) == 0 && (cte == "" || cte == "7bit" || cte == "8bit" || cte == "binary") &&
		(cs == "utf-8" || cs == "utf8" || ((cs == "" || cs == "us-ascii") && IsASCII(string(text))))
	if verbatim {
		p.mimeVerbatim(h, root)
		return text, false
	}
	h.MIMEVersion = "1.0"
	params := map[string]string{"charset": "utf-8"}
	if len(texts) == 1 && texts[0].mediaType == "text/plain" {
		// format=flowed text is delivered as is, so the parameters still hold.
		for _, k := range []string{"format", "delsp"} {
			if v := texts[0].params[k]; v != "" && len(v) < 8 {
				params[k] = strings.ToLower(v)
			}
		}
	}
	h.MIMEContentType = mime.FormatMediaType("text/plain", params)
	if IsASCII(string(text)) {
		h.MIMEContentTransferEncoding = "7bit"
	} else {
		h.MIMEContentTransferEncoding = "8bit"
	}
	if len(texts) > 0 {
		p.mimeIDDescription(h, texts[0].header)
	}
	return text, true
}

// mimeVerbatim copies the MIME fields as received, within their limits.
func (p *parser) mimeVerbatim(h *emsd.Heading, root *part) {
	if v := oneLine(p.h.Get("Mime-Version")); v != "" {
		if len(v) > emsd.MaxMIMEVersion || !IsASCII(v) {
			p.note("MIME-Version %q replaced by 1.0", v)
			v = "1.0"
		}
		h.MIMEVersion = v
	}
	if v := oneLine(p.h.Get("Content-Type")); v != "" {
		if len(v) > emsd.MaxMIMEField || !IsASCII(v) {
			params := map[string]string{}
			if cs := root.params["charset"]; cs != "" {
				params["charset"] = strings.ToLower(cs)
			}
			v = mime.FormatMediaType("text/plain", params)
			p.note("Content-Type over %d octets rewritten as %s", emsd.MaxMIMEField, v)
		}
		h.MIMEContentType = v
	}
	if v := oneLine(p.h.Get("Content-Transfer-Encoding")); v != "" && len(v) <= emsd.MaxMIMEField {
		h.MIMEContentTransferEncoding = v
	}
	p.mimeIDDescription(h, p.h.Header)
}

func (p *parser) mimeIDDescription(h *emsd.Heading, hdr message.Header) {
	if v := oneLine(hdr.Get("Content-Id")); v != "" {
		if len(v) <= emsd.MaxMIMEField && IsASCII(v) {
			h.MIMEContentID = v
		} else {
			p.note("Content-ID over %d octets dropped", emsd.MaxMIMEField)
		}
	}
	if v := hdr.Get("Content-Description"); v != "" {
		v = oneLine(decodeWords(v))
		h.MIMEContentDescription = cutUTF8(v, emsd.MaxMIMEField)
		if h.MIMEContentDescription != v {
			p.note("Content-Description cut to %d octets", emsd.MaxMIMEField)
		}
	}
}
