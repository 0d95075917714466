package decode

import (
	"github.com/esro-emsdp/emsdp/emsd"
)

// content decodes whole contents; a failure is reported inside.
func content(ct emsd.ContentType, b []byte, o emsd.Options) *ContentInfo {
	c, err := emsd.DecodeContents(ct, b, o)
	if err != nil {
		return &ContentInfo{Type: ct.String(), Malformed: err.Error()}
	}
	return contentInfo(c, o)
}

func contentInfo(c emsd.Content, o emsd.Options) *ContentInfo {
	out := &ContentInfo{Type: c.ContentType().String()}
	switch c := c.(type) {
	case *emsd.IPM:
		h := &c.Heading
		if h.Sender != nil {
			out.Sender = h.Sender.String()
		}
		out.Originator = h.Originator.String()
		for _, r := range h.Recipients {
			s := r.Recipient.String()
			if r.Flags != 0 {
				s += " (" + r.Flags.String() + ")"
			}
			out.Recipients = append(out.Recipients, s)
		}
		for _, a := range h.ReplyTo {
			out.ReplyTo = append(out.ReplyTo, a.String())
		}
		subj := h.Subject
		out.Subject = &subj
		if h.Flags != 0 {
			out.Flags = h.Flags.String()
		}
		out.MIMEType = h.MIMEContentType
		n := 0
		if c.Body != nil {
			n = len(c.Body.Text)
		}
		out.BodyLength = &n
	case *emsd.ReportDelivery:
		out.Reported = c.ReportedMessageID.String()
		for _, p := range c.Recipients {
			oc := Outcome{Recipient: p.Recipient.String()}
			switch {
			case p.Delivery != nil:
				oc.Delivered = p.Delivery.DeliveryTime.String()
			case p.NonDelivery != nil:
				oc.Reason = p.NonDelivery.Reason.String()
				if p.NonDelivery.Diagnostic != nil {
					oc.Diagnostic = p.NonDelivery.Diagnostic.String()
				}
				oc.Explanation = p.NonDelivery.Explanation
			default:
				oc.Reason = "no report"
			}
			out.Outcomes = append(out.Outcomes, oc)
		}
		if rc := c.ReturnedContent; rc != nil && rc.Contents != nil {
			out.Returned = content(rc.ContentType, rc.Contents, o)
		}
	case *emsd.ProbeSubmission:
		out.Sender = c.Sender.String()
		for _, r := range c.Recipients {
			out.Recipients = append(out.Recipients, r.String())
		}
		out.ProbeLength = c.ContentLength
	}
	return out
}
