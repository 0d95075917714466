package emsd

import (
	"fmt"
	"strconv"
	"time"
)

// Version is an EMSD protocol version (§1.3). The zero value is 1.1.
type Version uint8

const (
	V1_1 Version = iota // EMSD 1.1, the default
	V1_0                // EMSD 1.0 as released (§4)
)

func (v Version) String() string {
	switch v {
	case V1_1:
		return "1.1"
	case V1_0:
		return "1.0"
	}
	return "Version(" + strconv.Itoa(int(v)) + ")"
}

func (v Version) valid() bool { return v == V1_1 || v == V1_0 }

// ParseVersion parses "major.minor" as found in the reference's
// EMSD-Protocol-Version profile key (§9.2).
func ParseVersion(s string) (Version, error) {
	switch s {
	case "1.1":
		return V1_1, nil
	case "1.0":
		return V1_0, nil
	}
	return 0, fmt.Errorf("emsd: unsupported protocol version %q", s)
}

// Options select the encoding of one Marshal/Unmarshal call.
type Options struct {
	Version Version
	// ReverseSequenceOf writes every SEQUENCE OF last element first, as the
	// reference encoder does (§2.11, Open Point 22). It is meant for
	// byte-exact comparison with reference captures; decoding is unaffected
	// (elements are returned in wire order).
	ReverseSequenceOf bool

	// noLimits skips the encoder's size checks, so that this package's
	// tests can build over-limit encodings for the decoders.
	noLimits bool
}

// Operation is an ESRO operation value (6 bits on the wire, §1.4). The
// named constants are the 1.1 values; 1.0 values are the OpXxxV1_0
// constants and Wire/ParseOperation convert between the two.
type Operation uint8

// Operation values of EMSD 1.1 (§1.4).
const (
	OpDeliveryControl   Operation = 2
	OpSubmissionControl Operation = 4 // no argument defined; answer ERROR 7 (§12 Open Point 20)
	OpDeliveryVerify    Operation = 5
	OpSubmissionVerify  Operation = 6
	OpGetConfiguration  Operation = 7 // no argument defined; answer ERROR 7
	OpSetConfiguration  Operation = 8 // no argument defined; answer ERROR 7
	OpSubmission        Operation = 33
	OpDelivery          Operation = 35
)

// Operation values of EMSD 1.0 as released (§1.4). (The 1.0 paper values 1
// and 3 for submission and delivery were never used.) 1.0 has no verify
// operations.
const (
	OpSubmissionV1_0        Operation = 0
	OpDeliveryV1_0          Operation = 1
	OpDeliveryControlV1_0   Operation = 2
	OpSubmissionControlV1_0 Operation = 4
	OpGetConfigurationV1_0  Operation = 7
	OpSetConfigurationV1_0  Operation = 8
)

// Wire returns the operation value that carries op (a 1.1 constant) in
// version v; ok is false when v has no such operation.
func (op Operation) Wire(v Version) (value Operation, ok bool) {
	switch v {
	case V1_1:
		switch op {
		case OpDeliveryControl, OpSubmissionControl, OpDeliveryVerify, OpSubmissionVerify,
			OpGetConfiguration, OpSetConfiguration, OpSubmission, OpDelivery:
			return op, true
		}
	case V1_0:
		switch op {
		case OpSubmission:
			return OpSubmissionV1_0, true
		case OpDelivery:
			return OpDeliveryV1_0, true
		case OpDeliveryControl, OpSubmissionControl, OpGetConfiguration, OpSetConfiguration:
			return op, true
		}
	}
	return 0, false
}

// ParseOperation maps an operation value received under version v to its
// 1.1 identity (the inverse of Wire).
func ParseOperation(value Operation, v Version) (Operation, bool) {
	for _, op := range []Operation{OpDeliveryControl, OpSubmissionControl, OpDeliveryVerify,
		OpSubmissionVerify, OpGetConfiguration, OpSetConfiguration, OpSubmission, OpDelivery} {
		if w, ok := op.Wire(v); ok && w == value {
			return op, true
		}
	}
	return 0, false
}

// String names a 1.1 operation value.
func (op Operation) String() string {
	switch op {
	case OpDeliveryControl:
		return "delivery-control"
	case OpSubmissionControl:
		return "submission-control"
	case OpDeliveryVerify:
		return "delivery-verify"
	case OpSubmissionVerify:
		return "submission-verify"
	case OpGetConfiguration:
		return "get-configuration"
	case OpSetConfiguration:
		return "set-configuration"
	case OpSubmission:
		return "submission"
	case OpDelivery:
		return "delivery"
	}
	return "op(" + strconv.Itoa(int(op)) + ")"
}

// SAP is an ESRO service access point selector (§1.2, docs/protocol.md EMSD §1.2).
// Invoker selectors are performer − 1.
type SAP uint8

// EMSD SAP selectors (§1.2).
const (
	SAPMTSInvoker3Way   SAP = 2 // MTS delivers (3-way) from here ...
	SAPUAPerformer3Way  SAP = 3 // ... to here
	SAPUAInvoker3Way    SAP = 4 // UA submits from here ...
	SAPMTSPerformer3Way SAP = 5 // ... to here
	SAPMTSInvoker2Way   SAP = 6 // MTS delivers (2-way) and verifies submissions from here ...
	SAPUAPerformer2Way  SAP = 7 // ... to here
	SAPUAInvoker2Way    SAP = 8 // UA sends delivery control / verify from here ...
	SAPMTSPerformer2Way SAP = 9 // ... to here
)

// Ports and sizes of the ESRO binding (§1.2).
const (
	DefaultPort        = 641  // project default EMSD UDP port
	IANAPort           = 642  // esro-emsdp in today's IANA registry
	ReferencePort      = 2002 // port of the reference binaries
	DefaultMaxUserData = 1500 // ESRO PduSize: user data per INVOKE, instance-id octet included
)

// Reassembly timers of the reference (§8).
const (
	MTSReassemblyTimeout = 120 * time.Second
	UAReassemblyTimeout  = 60 * time.Second
)

// Limits of §3/§5. Decoders reject larger values (1.0 does not limit the
// subject, MIME fields or the number of extensions, §4); encoders refuse
// them.
const (
	MaxRecipients          = 256 // recipient-data, probe recipients, report entries
	MaxReplyTo             = 256
	MaxSubject             = 127
	MaxPassword            = 16
	MaxContent             = 65535 // declared by the reference; not enforced on the wire
	MaxWaitingContentTypes = 128
	MaxMessageID           = 127 // rfc822 MessageId
	MaxExtensions          = 64
	MaxEMSDName            = 64
	MaxRFC822Address       = 127
	MaxMIMEVersion         = 8
	MaxMIMEField           = 127 // MIME content type, id, description, transfer encoding
	MaxSegments            = 32
	MaxAddressOctets       = 5 // BCD EMSDAddressValue
)

// ContentType selects how contents are decoded (§3, §5).
type ContentType uint32

// Content types (§5).
const (
	ContentProbe          ContentType = 1
	ContentDeliveryReport ContentType = 2
	ContentIPM            ContentType = 32 // ipm95
	ContentVoice          ContentType = 33 // undefined contents
)

func (c ContentType) String() string {
	switch c {
	case ContentProbe:
		return "probe"
	case ContentDeliveryReport:
		return "delivery-report"
	case ContentIPM:
		return "ipm95"
	case ContentVoice:
		return "voice-message"
	}
	return "content-type(" + strconv.FormatUint(uint64(c), 10) + ")"
}

// DeliveryStatus is the DeliveryVerifyResult status (§5).
type DeliveryStatus uint32

const (
	NoReportSent          DeliveryStatus = 1
	DeliveryReportSent    DeliveryStatus = 2
	NonDeliveryReportSent DeliveryStatus = 3
)

// String returns the status as the tools show it (no-report-sent,
// delivery-report-sent, non-delivery-report-sent), or "unknown-N" for a
// value the protocol does not define (a tool prints the number beside it).
func (s DeliveryStatus) String() string {
	switch s {
	case NoReportSent:
		return "no-report-sent"
	case DeliveryReportSent:
		return "delivery-report-sent"
	case NonDeliveryReportSent:
		return "non-delivery-report-sent"
	}
	return "unknown-" + strconv.FormatUint(uint64(s), 10)
}

// SubmissionStatus is the SubmissionVerifyResult status (§5).
type SubmissionStatus uint32

const (
	SendMessage SubmissionStatus = 1
	DropMessage SubmissionStatus = 2
)

// String returns the status as the tools show it (send-message,
// drop-message), or "unknown-N" for a value the protocol does not define.
func (s SubmissionStatus) String() string {
	switch s {
	case SendMessage:
		return "send-message"
	case DropMessage:
		return "drop-message"
	}
	return "unknown-" + strconv.FormatUint(uint64(s), 10)
}

// Restrict is DeliveryControlArgument.restrict (§5).
type Restrict uint32

const (
	RestrictUpdate Restrict = 1 // default
	RestrictRemove Restrict = 2
)

// Priority is DeliveryControlArgument.permissible-lowest-priority (§5).
type Priority uint32

const (
	PriorityNonUrgent Priority = 0
	PriorityNormal    Priority = 1
	PriorityUrgent    Priority = 2
)

// CompressionMethod is Body.compression-method (never produced by the reference).
type CompressionMethod uint32

const (
	CompressionNone      CompressionMethod = 0
	CompressionLempelZiv CompressionMethod = 1
)

// NonDeliveryReason is NonDeliveryReport.reason (§5).
type NonDeliveryReason uint32

const (
	ReasonTransferFailure    NonDeliveryReason = 0
	ReasonUnableToTransfer   NonDeliveryReason = 1
	ReasonRestrictedDelivery NonDeliveryReason = 2
)

// Diagnostic is NonDeliveryReport.diagnostic (§5).
type Diagnostic uint32

const (
	DiagCongestion               Diagnostic = 0
	DiagLoopDetected             Diagnostic = 1
	DiagRecipientUnavailable     Diagnostic = 2
	DiagMaximumTimeExpired       Diagnostic = 3
	DiagContentTooLong           Diagnostic = 4
	DiagSizeConstraintViolated   Diagnostic = 5
	DiagProtocolViolation        Diagnostic = 6
	DiagContentTypeNotSupported  Diagnostic = 7
	DiagTooManyRecipients        Diagnostic = 8
	DiagLineTooLong              Diagnostic = 9
	DiagUnrecognizedAddress      Diagnostic = 10
	DiagRecipientUnknown         Diagnostic = 11
	DiagRecipientRefused         Diagnostic = 12
	DiagUnableToCompleteTransfer Diagnostic = 13
	DiagTransferAttemptsLimit    Diagnostic = 14
)

var diagNames = [...]string{
	"congestion", "loop-detected", "recipient-unavailable", "maximum-time-expired",
	"content-too-long", "size-constraint-violated", "protocol-violation",
	"content-type-not-supported", "too-many-recipients", "line-too-long",
	"unrecognized-address", "recipient-unknown", "recipient-refused-to-accept",
	"unable-to-complete-transfer", "transfer-attempts-limit-reached",
}

func (d Diagnostic) String() string {
	if int(d) < len(diagNames) {
		return diagNames[d]
	}
	return "diagnostic(" + strconv.FormatUint(uint64(d), 10) + ")"
}

func (r NonDeliveryReason) String() string {
	switch r {
	case ReasonTransferFailure:
		return "transfer-failure"
	case ReasonUnableToTransfer:
		return "unable-to-transfer"
	case ReasonRestrictedDelivery:
		return "restricted-delivery"
	}
	return "reason(" + strconv.FormatUint(uint64(r), 10) + ")"
}

// Time is an EMSD time: seconds since 1970-01-01 00:00 UTC, unsigned 32 bit.
type Time uint32

// UTC returns t as a time.Time in UTC.
func (t Time) UTC() time.Time { return time.Unix(int64(t), 0).UTC() }

// TimeOf converts tm to an EMSD time, clamping to the representable range.
func TimeOf(tm time.Time) Time {
	s := tm.Unix()
	switch {
	case s < 0:
		return 0
	case s > 0xFFFFFFFF:
		return 0xFFFFFFFF
	}
	return Time(s)
}

func (t Time) String() string { return t.UTC().Format(time.RFC3339) }
