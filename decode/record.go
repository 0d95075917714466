package decode

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// Record is one decoded datagram. Its JSON form is what `emsdp decode
// --json` prints, one object per line; its text form is Write and its
// one-line form (tracing) is Line.
type Record struct {
	Frame  int        `json:"frame,omitempty"` // 1-based position in the capture
	Time   *time.Time `json:"time,omitempty"`
	Src    string     `json:"src,omitempty"` // ip:port
	Dst    string     `json:"dst,omitempty"`
	Length int        `json:"length"` // UDP payload octets
	// Marks name what this datagram repeats: "retransmission" (the same
	// octets again within one invocation), "duplicate" (an ACK repeated,
	// an EMSD re-invocation, a segment seen before).
	Marks []string `json:"marks,omitempty"`
	// Malformed says why the datagram is not a valid ESRO PDU (empty,
	// type 5-7, shorter than its header, truncated capture).
	Malformed string    `json:"malformed,omitempty"`
	ESRO      *ESROInfo `json:"esro,omitempty"`
	EMSD      *EMSDInfo `json:"emsd,omitempty"`
}

// ESROInfo is the ESRO header.
type ESROInfo struct {
	Type          string `json:"type"`
	SAP           *uint8 `json:"sap,omitempty"` // INVOKE: destination SAP
	Ref           uint8  `json:"ref"`
	Operation     *uint8 `json:"operation,omitempty"`
	Encoding      string `json:"encoding,omitempty"`
	ErrorValue    *uint8 `json:"error_value,omitempty"`
	FailureReason *uint8 `json:"failure_reason,omitempty"`
	FailureName   string `json:"failure_name,omitempty"`
	HeaderLength  int    `json:"header_length"`
	DataLength    int    `json:"data_length"`
	// InvokeFrame is the frame of the INVOKE a reply, ACK or FAILURE
	// belongs to, when the capture has it.
	InvokeFrame int `json:"invoke_frame,omitempty"`
}

// EMSDInfo is the EMSD operation carried by the ESRO user data.
type EMSDInfo struct {
	Operation  string       `json:"operation,omitempty"` // "submission", "delivery", ...
	PDU        string       `json:"pdu,omitempty"`       // "SubmitArgument", "ErrorParameter", ...
	Version    string       `json:"version,omitempty"`
	InstanceID *uint8       `json:"instance_id,omitempty"`
	Security   *Security    `json:"security,omitempty"`
	Segment    *Segment     `json:"segment,omitempty"`
	MessageID  string       `json:"message_id,omitempty"`
	Submitted  string       `json:"submission_time,omitempty"`
	Delivered  string       `json:"delivery_time,omitempty"`
	Content    string       `json:"content_type,omitempty"`
	ContentLen *int         `json:"content_length,omitempty"` // octets in this datagram
	Reassembly *Reassembly  `json:"reassembly,omitempty"`
	Body       *ContentInfo `json:"content,omitempty"`
	Error      *ErrorInfo   `json:"error,omitempty"`
	Control    []Field      `json:"control,omitempty"` // delivery control argument or result
	Status     string       `json:"status,omitempty"`  // verify results
	// Malformed says why the user data did not decode; Note carries
	// anything else worth knowing (operation unknown, 1.0 guess...).
	Malformed string `json:"malformed,omitempty"`
	Note      string `json:"note,omitempty"`
}

// Security is a security element with the password masked.
type Security struct {
	Address  string `json:"address,omitempty"`
	Name     string `json:"name,omitempty"`
	Password string `json:"password,omitempty"` // always Mask when present
}

// Mask replaces every password shown.
const Mask = "********"

// Segment is SegmentInfo.
type Segment struct {
	SequenceID uint32 `json:"sequence_id"`
	First      bool   `json:"first"`
	Total      uint32 `json:"total,omitempty"`  // first segment
	Number     uint32 `json:"number,omitempty"` // other segments: 1..n-1
}

// Reassembly reports a segmented message made whole at this datagram,
// or why it could not be.
type Reassembly struct {
	Complete bool   `json:"complete"`
	Segments uint32 `json:"segments,omitempty"`
	Length   int    `json:"length,omitempty"`
	Error    string `json:"error,omitempty"`
}

// ContentInfo is a decoded content: an IPM, a report or a probe.
type ContentInfo struct {
	Type        string       `json:"type"`
	Sender      string       `json:"sender,omitempty"`
	Originator  string       `json:"originator,omitempty"`
	Recipients  []string     `json:"recipients,omitempty"`
	ReplyTo     []string     `json:"reply_to,omitempty"`
	Subject     *string      `json:"subject,omitempty"`
	Flags       string       `json:"flags,omitempty"`
	MIMEType    string       `json:"mime_content_type,omitempty"`
	BodyLength  *int         `json:"body_length,omitempty"`
	Reported    string       `json:"reported_message_id,omitempty"`
	Outcomes    []Outcome    `json:"outcomes,omitempty"`
	ProbeLength *uint32      `json:"probe_content_length,omitempty"`
	Returned    *ContentInfo `json:"returned_content,omitempty"`
	Malformed   string       `json:"malformed,omitempty"`
}

// Outcome is one recipient of a delivery report.
type Outcome struct {
	Recipient   string `json:"recipient"`
	Delivered   string `json:"delivered,omitempty"` // delivery time
	Reason      string `json:"reason,omitempty"`    // non-delivery
	Diagnostic  string `json:"diagnostic,omitempty"`
	Explanation string `json:"explanation,omitempty"`
}

// ErrorInfo is an EMSD error: the ESRO error value and its parameter.
type ErrorInfo struct {
	Code      uint8  `json:"code"`
	Name      string `json:"name"`
	Parameter *uint8 `json:"parameter,omitempty"`
}

// Field is one named value of a control PDU.
type Field struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Write prints r as a header line and indented detail lines.
func (r *Record) Write(w io.Writer) error {
	var b strings.Builder
	if r.Frame > 0 {
		fmt.Fprintf(&b, "#%d ", r.Frame)
	}
	if r.Time != nil {
		b.WriteString(r.Time.UTC().Format("2006-01-02T15:04:05.000000Z "))
	}
	if r.Src != "" || r.Dst != "" {
		fmt.Fprintf(&b, "%s → %s ", r.Src, r.Dst)
	}
	b.WriteString(r.esroLine())
	b.WriteByte('\n')
	if e := r.EMSD; e != nil {
		for _, l := range e.lines() {
			b.WriteString("    ")
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Line is r in one line, for trace logs.
func (r *Record) Line() string {
	s := r.esroLine()
	if e := r.EMSD; e != nil {
		s += " | " + strings.Join(e.lines(), "; ")
	}
	return s
}

func (r *Record) esroLine() string {
	var b strings.Builder
	if e := r.ESRO; e != nil {
		b.WriteString(e.Type)
		if e.SAP != nil {
			fmt.Fprintf(&b, " sap=%d", *e.SAP)
		}
		fmt.Fprintf(&b, " ref=%d", e.Ref)
		if e.Operation != nil {
			fmt.Fprintf(&b, " op=%d", *e.Operation)
		}
		if e.Encoding != "" {
			b.WriteString(" enc=" + e.Encoding)
		}
		if e.ErrorValue != nil {
			fmt.Fprintf(&b, " error=%d", *e.ErrorValue)
		}
		if e.FailureReason != nil {
			fmt.Fprintf(&b, " reason=%d (%s)", *e.FailureReason, e.FailureName)
		}
		fmt.Fprintf(&b, " len=%d+%d", e.HeaderLength, e.DataLength)
		if e.InvokeFrame > 0 {
			fmt.Fprintf(&b, " invoke=#%d", e.InvokeFrame)
		}
	} else {
		fmt.Fprintf(&b, "len=%d", r.Length)
	}
	if r.Malformed != "" {
		b.WriteString(" [malformed: " + r.Malformed + "]")
	}
	for _, m := range r.Marks {
		b.WriteString(" [" + m + "]")
	}
	return b.String()
}

func (e *EMSDInfo) lines() []string {
	var out []string
	add := func(format string, a ...any) { out = append(out, fmt.Sprintf(format, a...)) }
	head := "EMSD"
	if e.Operation != "" {
		head += " " + e.Operation
	}
	if e.PDU != "" {
		head += " " + e.PDU
	}
	if e.Version != "" {
		head += " (" + e.Version + ")"
	}
	if e.InstanceID != nil {
		head += " instance=" + strconv.Itoa(int(*e.InstanceID))
	}
	out = append(out, head)
	if s := e.Security; s != nil {
		var parts []string
		if s.Address != "" {
			parts = append(parts, "device "+s.Address)
		}
		if s.Name != "" {
			parts = append(parts, "name "+strconv.Quote(s.Name))
		}
		if s.Password != "" {
			parts = append(parts, "password "+s.Password)
		}
		if len(parts) == 0 {
			parts = append(parts, "empty")
		}
		add("credentials: %s", strings.Join(parts, ", "))
	}
	if s := e.Segment; s != nil {
		if s.First {
			add("segment: first of %d, sequence %d", s.Total, s.SequenceID)
		} else {
			add("segment: number %d, sequence %d", s.Number, s.SequenceID)
		}
	}
	if e.MessageID != "" {
		add("message-id: %s", e.MessageID)
	}
	if e.Submitted != "" {
		add("submission-time: %s", e.Submitted)
	}
	if e.Delivered != "" {
		add("delivery-time: %s", e.Delivered)
	}
	if e.Content != "" {
		if e.ContentLen != nil {
			add("content-type: %s, %d octets here", e.Content, *e.ContentLen)
		} else {
			add("content-type: %s", e.Content)
		}
	}
	if r := e.Reassembly; r != nil {
		if r.Complete {
			add("reassembled: %d segments, %d octets", r.Segments, r.Length)
		} else if r.Error != "" {
			add("reassembly: %s", r.Error)
		}
	}
	if c := e.Body; c != nil {
		out = append(out, c.lines("")...)
	}
	if x := e.Error; x != nil {
		s := fmt.Sprintf("error: %d %s", x.Code, x.Name)
		if x.Parameter != nil && *x.Parameter != x.Code {
			s += fmt.Sprintf(" (parameter %d)", *x.Parameter)
		}
		out = append(out, s)
	}
	for _, f := range e.Control {
		add("%s: %s", f.Name, f.Value)
	}
	if e.Status != "" {
		add("status: %s", e.Status)
	}
	if e.Malformed != "" {
		add("malformed: %s", e.Malformed)
	}
	if e.Note != "" {
		add("note: %s", e.Note)
	}
	return out
}

func (c *ContentInfo) lines(indent string) []string {
	var out []string
	add := func(format string, a ...any) { out = append(out, indent+fmt.Sprintf(format, a...)) }
	add("content: %s", c.Type)
	if c.Sender != "" {
		add("sender: %s", c.Sender)
	}
	if c.Originator != "" {
		add("originator: %s", c.Originator)
	}
	if len(c.Recipients) > 0 {
		add("recipients: %s", strings.Join(c.Recipients, ", "))
	}
	if len(c.ReplyTo) > 0 {
		add("reply-to: %s", strings.Join(c.ReplyTo, ", "))
	}
	if c.Subject != nil {
		add("subject: %s", strconv.Quote(*c.Subject))
	}
	if c.Flags != "" {
		add("flags: %s", c.Flags)
	}
	if c.MIMEType != "" {
		add("mime-content-type: %s", c.MIMEType)
	}
	if c.BodyLength != nil {
		add("body: %d octets", *c.BodyLength)
	}
	if c.Reported != "" {
		add("reported message-id: %s", c.Reported)
	}
	for _, o := range c.Outcomes {
		if o.Delivered != "" {
			add("report: %s delivered %s", o.Recipient, o.Delivered)
			continue
		}
		s := fmt.Sprintf("report: %s not delivered: %s", o.Recipient, o.Reason)
		if o.Diagnostic != "" {
			s += " (" + o.Diagnostic + ")"
		}
		if o.Explanation != "" {
			s += " " + strconv.Quote(o.Explanation)
		}
		out = append(out, indent+s)
	}
	if c.ProbeLength != nil {
		add("probed content length: %d", *c.ProbeLength)
	}
	if c.Returned != nil {
		out = append(out, indent+"returned content:")
		out = append(out, c.Returned.lines(indent+"  ")...)
	}
	if c.Malformed != "" {
		add("content malformed: %s", c.Malformed)
	}
	return out
}
