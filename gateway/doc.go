// Package gateway is the SMTP side of EMSD: InboundServer receives Internet
// mail for devices and Relay sends device mail to a smarthost. The conversion
// between mail and EMSD content is package mailconv; this package only moves
// bytes over SMTP (go-smtp) and classifies the outcomes. Comments cite the
// EMSD sections of docs/protocol.md as "§n" and its open points (§12) as
// "OP n".
//
// "Inbound" in this module means mail arriving from the Internet over SMTP:
// InboundServer here and the server's Receiver for it.
//
// # Relay
//
// Relay sends one message to a smarthost and reports the outcome per
// recipient, with the RFC 3461 DSN parameters of a DSNRequest; IsPermanent
// and NonDeliveryFor turn its errors into retry decisions and EMSD
// non-delivery reasons.
//
// # InboundServer
//
// InboundServer is an MX-like SMTP receiver (no AUTH: it only accepts mail
// for the recipients its Receiver accepts) that hands complete messages to a
// Receiver; it bounds the sessions open at once, in all and per client,
// answering a connection over a limit 421 at the greeting.
package gateway
