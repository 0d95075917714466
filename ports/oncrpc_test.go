package ports

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func words(ws ...uint32) []byte {
	var b []byte
	for _, w := range ws {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	return b
}

func TestRPCNullCall(t *testing.T) {
	got := rpcNullCall(0x07123456, 200100000, 2)
	want := "07123456" + "00000000" + "00000002" + "0bed48a0" + "00000002" + "00000000" + strings.Repeat("00000000", 4)
	if hex.EncodeToString(got) != want {
		t.Fatalf("rpcNullCall = %x, want %s", got, want)
	}
	if got[0]&7 != 7 {
		t.Fatal("xid's first octet must read as ESRO type 7")
	}
	if x := rpcXID(0); x>>24&7 != 7 {
		t.Fatalf("rpcXID(0) = %#x", x)
	}
	if framed := recordMark(got); binary.BigEndian.Uint32(framed) != 0x80000000|40 || len(framed) != 44 {
		t.Fatalf("recordMark = %x", framed)
	}
}

func TestParseRPCReply(t *testing.T) {
	const xid = 0x07abcdef
	accepted := func(tail ...uint32) []byte {
		return append(words(xid, rpcReply, msgAccepted, 0, 0), words(tail...)...)
	}
	tests := []struct {
		name   string
		in     []byte
		want   rpcReplyMsg
		str    string
		errNot bool // want errNotRPCReply
	}{
		{"success", accepted(acceptSuccess), rpcReplyMsg{XID: xid, Accepted: true}, "MSG_ACCEPTED SUCCESS", false},
		{"success with results", accepted(acceptSuccess, 1, 2), rpcReplyMsg{XID: xid, Accepted: true}, "MSG_ACCEPTED SUCCESS", false},
		{"prog unavail", accepted(acceptProgUnavail), rpcReplyMsg{XID: xid, Accepted: true, AcceptStat: 1}, "MSG_ACCEPTED PROG_UNAVAIL", false},
		{"prog mismatch", accepted(acceptProgMismatch, 1, 3), rpcReplyMsg{XID: xid, Accepted: true, AcceptStat: 2, Low: 1, High: 3}, "MSG_ACCEPTED PROG_MISMATCH (versions 1..3)", false},
		{"proc unavail", accepted(acceptProcUnavail), rpcReplyMsg{XID: xid, Accepted: true, AcceptStat: 3}, "MSG_ACCEPTED PROC_UNAVAIL", false},
		{"system err", accepted(acceptSystemErr), rpcReplyMsg{XID: xid, Accepted: true, AcceptStat: 5}, "MSG_ACCEPTED SYSTEM_ERR", false},
		{"verifier with body", append(words(xid, rpcReply, msgAccepted, 1, 5), append([]byte{1, 2, 3, 4, 5, 0, 0, 0}, words(acceptSuccess)...)...),
			rpcReplyMsg{XID: xid, Accepted: true}, "MSG_ACCEPTED SUCCESS", false},
		{"rpc mismatch", words(xid, rpcReply, msgDenied, rejectRPCMismatch, 2, 2), rpcReplyMsg{XID: xid, Low: 2, High: 2}, "MSG_DENIED RPC_MISMATCH (RPC versions 2..2)", false},
		{"auth error", words(xid, rpcReply, msgDenied, rejectAuthError, 5), rpcReplyMsg{XID: xid, RejectStat: 1, AuthStat: 5}, "MSG_DENIED AUTH_ERROR (auth_stat 5)", false},
		{"a call", rpcNullCall(xid, 100000, 2), rpcReplyMsg{}, "", true},
		{"esro failure", []byte{4, 0xa7, 2}, rpcReplyMsg{}, "", true},
		{"empty", nil, rpcReplyMsg{}, "", true},
		{"truncated accept", words(xid, rpcReply, msgAccepted, 0), rpcReplyMsg{}, "", true},
		{"truncated mismatch", accepted(acceptProgMismatch, 1), rpcReplyMsg{}, "", true},
		{"verifier too long", words(xid, rpcReply, msgAccepted, 0, 401), rpcReplyMsg{}, "", true},
		{"verifier past end", words(xid, rpcReply, msgAccepted, 0, 8, 0), rpcReplyMsg{}, "", true},
		{"bad accept stat", accepted(6), rpcReplyMsg{}, "", true},
		{"bad reply stat", words(xid, rpcReply, 2), rpcReplyMsg{}, "", true},
		{"bad reject stat", words(xid, rpcReply, msgDenied, 2), rpcReplyMsg{}, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseRPCReply(tt.in)
			if tt.errNot {
				if !errors.Is(err, errNotRPCReply) {
					t.Fatalf("err = %v, want errNotRPCReply", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if got.String() != tt.str {
				t.Fatalf("String() = %q, want %q", got.String(), tt.str)
			}
		})
	}
}

func FuzzParseRPCReply(f *testing.F) {
	f.Add(words(7, rpcReply, msgAccepted, 0, 0, acceptSuccess))
	f.Add(words(7, rpcReply, msgAccepted, 0, 0, acceptProgMismatch, 1, 2))
	f.Add(words(7, rpcReply, msgDenied, rejectAuthError, 1))
	f.Add(rpcNullCall(7, 100000, 2))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseRPCReply(b)
		if err != nil {
			return
		}
		if len(b) < 16 {
			t.Fatalf("accepted a %d-octet reply: %+v", len(b), m)
		}
		if m.XID != binary.BigEndian.Uint32(b) {
			t.Fatalf("xid %#x not from the first word of % x", m.XID, b)
		}
		_ = m.String()
	})
}

// Every transaction id and reference number the probes can draw is free of
// line ends, so TestProbeDatagramsAreBinary holds for every random draw.
func TestProbeRandomOctetsHaveNoLineEnds(t *testing.T) {
	for b := range 256 {
		if c := noLineEnd(byte(b)); c == '\n' || c == '\r' {
			t.Fatalf("noLineEnd(%#x) = %#x", b, c)
		}
	}
	for _, r := range []uint32{0, 0x0a0a0a0a, 0x0d0d0d0d, 0xffffffff, 0x120a340d} {
		x := rpcXID(r)
		for i := range 4 {
			if c := byte(x >> (8 * i)); c == '\n' || c == '\r' {
				t.Fatalf("rpcXID(%#x) = %#x", r, x)
			}
		}
		if x>>24&7 != 7 {
			t.Fatalf("rpcXID(%#x) = %#x: not ESRO type 7", r, x)
		}
	}
}
