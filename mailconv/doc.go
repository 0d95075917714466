// Package mailconv converts between Internet mail (RFC 5322/MIME) and EMSD
// content, and writes RFC 3464 delivery status notifications. It does no I/O:
// the SMTP side (receiving and relaying mail) is package gateway, so that a
// device client can write a Maildir file without linking an SMTP stack.
// Comments cite the EMSD sections of docs/protocol.md as "§n" and its open
// points (§12) as "OP n".
//
// # Internet mail → EMSD (§9.8, §6.2)
//
// ParseMessage turns a mail into a Parsed: an IPM (content type 32) or, for
// mail carrying "X-EMSD-Message-Type: Report", a ReportDelivery (content type
// 2, OP 16). Unlike the reference it never produces content the EMSD codec
// cannot encode (OP 8): strings are cut to their §5 limits on UTF-8
// boundaries, lists are capped, trace headers (Received, DKIM-Signature, ...)
// are not turned into extensions, and the encoded content is kept within
// ParseOptions.MaxContent (32 segments, §8) by shedding heading extras and
// cutting the body. Every cut is described in Parsed.Truncated.
//
// The body is one text: text/plain is preferred (the plain alternative of a
// multipart/alternative, the first inline text part of a multipart/mixed,
// further inline text parts appended), HTML-only mail is converted to text,
// transfer encodings and charsets are decoded, and line ends become LF as in
// the reference's deliveries (§3 notes). When the body was transformed the
// IPM's MIME fields describe what is actually delivered: MIME-Version 1.0,
// text/plain; charset=utf-8, 7bit or 8bit. Omitted parts (attachments) are
// listed in a short note at the end of the body.
//
// # EMSD → Internet mail (§9.6)
//
// FormatIPM renders a submitted IPM as a Formatted: an SMTP-ready message
// with CRLF line ends, RFC 2047 encoded words for non-ASCII text,
// quoted-printable bodies where 7-bit lines would not do, and the envelope
// (Bcc recipients only there). Recipients that are EMSD devices are marked
// Local so that the server can route device-to-device mail without leaving
// the host.
//
// # Delivery status notifications
//
// DSN writes a bounce or success notification (RFC 3464, RFC 6533 for
// SMTPUTF8 senders); StatusFor gives the RFC 3463 status code for an EMSD
// non-delivery diagnostic. In this module "DSN" means only that: the
// PostgreSQL connection string is called the conninfo.
package mailconv
