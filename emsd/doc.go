// Package emsd is the data model and wire codec of EMSD (RFC 2524, Efficient
// Mail Submission and Delivery) as implemented by the Neda reference, for
// both the server (MTS) and the device (UA). It is independent of the ESRO
// engine: it works on ESRO user data (the octets after the ESRO header).
//
// Comments cite the EMSD sections of docs/protocol.md as "§n": notes, in
// this project's words, on RFC 2524 as the reference puts it on the wire.
//
// # Encoding
//
// Every PDU type has AppendMarshal/Marshal and Unmarshal methods taking
// Options, which select the protocol version (1.1, the zero value, or 1.0,
// §4) and whether SEQUENCE OF components are written in reverse order as
// the reference does (§2.11). The BER subset is that of §2: one-octet tags,
// definite lengths, unsigned 1–4 octet INTEGERs, one-octet flag BIT STRINGs,
// BCD addresses (1.1) and raw contents appended after the content type.
//
// Encoders refuse values the reference would reject (strings over the §5
// limits, too many elements); the limits are exported as Max* constants so
// that gateways can truncate first.
//
// # Decoding
//
// Decoders never panic and return *DecodeError, which carries the EMSD
// error code the failure maps to (§1.6) and works with errors.Is/As
// (errors.Is(err, CodeProtocolViolation), errors.Is(err, ErrTooLong), ...).
// Components are matched in order and unknown components are errors
// (§2.7). As in the reference, a SEQUENCE that ends before its trailing
// mandatory components is accepted and those components are left at their
// zero value. This applies to: EMSDAddress.emsd-address; LocalMessageId
// (both fields); SecurityElement.credentials; SegmentData (both fields);
// SubmitArgument.content-type; SubmitResult.local-message-id;
// DeliverArgument.message-id, delivery-time and content-type;
// DeliveryControlResult.waiting-content-types; the message-id of both
// verify arguments; both verify results' status; IPM.heading;
// Heading.originator, recipient-data and extensions (the latter also when
// followed by MIME fields, as §3 recommends); RecipientData.recipient;
// Extension label and value; Body.body-text; ReportDelivery.msg-id and
// per-recipient-data; PerRecipReportData.recipient and report (both
// report pointers then stay nil); DeliveryReport.message-delivery-time;
// NonDeliveryReport.reason; 1.1 returned-content content-type;
// ProbeSubmission sender and recipients. (An empty [0] sender wrapper is
// not a SEQUENCE and is rejected.)
//
// Optional components whose Go zero value is not a meaningful value are
// represented by that zero value (empty strings, zero flag sets, nil
// slices); optional integers use pointers. An empty optional string is
// therefore never sent.
//
// # Segmentation and duplicates
//
// Splitter cuts encoded content into Submit/Deliver arguments that fit the
// ESRO user-data size (§8, computed exactly rather than the reference's
// 1400/100 guess); Reassembler rebuilds it with the §8 rules under memory
// and time bounds. StripInstanceID, PrependInstanceID, InstanceCounter and
// DuplicateWindow implement the instance-id octet of §1.5.
package emsd
