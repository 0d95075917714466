package emsd

import (
	"strconv"
	"strings"
)

// Bit-set types: named bit n of the ASN.1 BIT STRING is the Go value 1<<n.
// On the wire bit n is mask 0x80>>(n%8) of data octet n/8 (§2.5).

// PerMessageFlags is Heading.per-message-flags (§3). Normal
// priority/importance is neither bit.
type PerMessageFlags uint8

const (
	MsgPriorityNonUrgent PerMessageFlags = 1 << 0
	MsgPriorityUrgent    PerMessageFlags = 1 << 1
	MsgImportanceLow     PerMessageFlags = 1 << 2
	MsgImportanceHigh    PerMessageFlags = 1 << 3
	MsgAutoForwarded     PerMessageFlags = 1 << 4
)

var perMessageNames = []string{"priority-non-urgent", "priority-urgent", "importance-low",
	"importance-high", "auto-forwarded"}

// Has reports whether all bits of f are set.
func (m PerMessageFlags) Has(f PerMessageFlags) bool { return m&f == f }

func (m PerMessageFlags) String() string { return flagString(uint64(m), perMessageNames) }

// PerRecipientFlags is RecipientData.per-recipient-flags (§3). No flags
// means a primary ("To") recipient.
type PerRecipientFlags uint8

const (
	RcptCopy                   PerRecipientFlags = 1 << 0 // Cc
	RcptBlindCopy              PerRecipientFlags = 1 << 1 // Bcc
	RcptReceiptNotification    PerRecipientFlags = 1 << 2
	RcptNonReceiptNotification PerRecipientFlags = 1 << 3
	RcptIPMReturn              PerRecipientFlags = 1 << 4
	RcptNonDeliveryReport      PerRecipientFlags = 1 << 5 // set by the reference on every Cc/Bcc (MTS) or recipient (UA)
	RcptDeliveryReport         PerRecipientFlags = 1 << 6
	RcptReplyRequested         PerRecipientFlags = 1 << 7
)

var perRecipientNames = []string{"copy-recipient", "blind-copy-recipient",
	"receipt-notification", "non-receipt-notification", "ipm-return",
	"non-delivery-report", "delivery-report", "reply-requested"}

// Has reports whether all bits of f are set.
func (r PerRecipientFlags) Has(f PerRecipientFlags) bool { return r&f == f }

func (r PerRecipientFlags) String() string { return flagString(uint64(r), perRecipientNames) }

// WaitingMessages is DeliveryControlResult.waiting-messages (§3, §5).
type WaitingMessages uint8

const (
	WaitingLongContent WaitingMessages = 1 << 2
	WaitingLowPriority WaitingMessages = 1 << 3
)

// Has reports whether all bits of f are set.
func (w WaitingMessages) Has(f WaitingMessages) bool { return w&f == f }

// OperationSet is a set of operation values, used by permissible-operations
// and waiting-operations. Bit index = operation value (Open Point 11);
// multi-octet strings are written in standard BER order.
type OperationSet uint64

// Operations returns the set containing ops (values must be < 64).
func Operations(ops ...Operation) OperationSet {
	var s OperationSet
	for _, op := range ops {
		s |= 1 << (op & 63)
	}
	return s
}

// Has reports whether op is in the set.
func (s OperationSet) Has(op Operation) bool { return op < 64 && s&(1<<op) != 0 }

func flagString(m uint64, names []string) string {
	if m == 0 {
		return "none"
	}
	var parts []string
	for i := range 64 {
		if m&(1<<i) == 0 {
			continue
		}
		if i < len(names) {
			parts = append(parts, names[i])
		} else {
			parts = append(parts, "bit"+strconv.Itoa(i))
		}
	}
	return strings.Join(parts, "|")
}
