package emsd

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/internal/ber"
)

// Segmentation errors.
var (
	// ErrContentTooLong matches *SegmentLimitError.
	ErrContentTooLong = errors.New("emsd: content needs more segments than allowed")
	// ErrEnvelopeTooLarge: the argument without contents does not fit the
	// user-data size (or a fixed chunk size does not fit it).
	ErrEnvelopeTooLarge = errors.New("emsd: argument envelope too large for the user-data size")
)

// SegmentLimitError reports content that would need more than the allowed
// number of segments (32, §8, Open Point 7). A server answers it with a
// non-delivery, diagnostic content-too-long (Diagnostic()).
type SegmentLimitError struct {
	Needed, Max int
}

func (e *SegmentLimitError) Error() string {
	return fmt.Sprintf("emsd: content needs %d segments, limit %d", e.Needed, e.Max)
}

// Is matches ErrContentTooLong.
func (e *SegmentLimitError) Is(target error) bool { return target == ErrContentTooLong }

// Diagnostic returns DiagContentTooLong.
func (e *SegmentLimitError) Diagnostic() Diagnostic { return DiagContentTooLong }

// Splitter cuts encoded content into Submit/Deliver arguments (§8). Unlike
// the reference, which assumes 100 octets of envelope and cuts 1400-octet
// chunks, it measures the real envelope (message id, times, security,
// segment info, content type) and makes every ESRO user data — the
// instance-id octet in 1.1 plus the encoded argument — at most MaxUserData.
type Splitter struct {
	Options     Options
	MaxUserData int // 0: DefaultMaxUserData (ESRO PduSize)
	MaxSegments int // 0 or more than 32: MaxSegments
	// ChunkSize forces a fixed chunk size (the reference uses 1400);
	// 0 picks the largest that fits. Either way every argument must fit.
	ChunkSize int
}

// SplitSubmit returns the encoded SubmitArgument(s) carrying content, with
// env's security and content type (env.Segment and env.Contents are
// ignored). Content that fits is sent unsegmented (one argument, no
// segment info); otherwise segment 0 is first{seqID, n} and segment k is
// other{seqID, k}. seqID is unused when the content is not segmented.
// The caller prepends an instance id to each argument (PrependInstanceID).
func (s *Splitter) SplitSubmit(env *SubmitArgument, content []byte, seqID uint32) ([][]byte, error) {
	a := *env
	return s.split(content, seqID, func(seg *SegmentInfo, chunk []byte) ([]byte, error) {
		a.Segment, a.Contents = seg, chunk
		return a.Marshal(s.Options)
	})
}

// SplitDeliver is SplitSubmit for DeliverArgument: every segment repeats
// env's message id, times and security.
func (s *Splitter) SplitDeliver(env *DeliverArgument, content []byte, seqID uint32) ([][]byte, error) {
	a := *env
	return s.split(content, seqID, func(seg *SegmentInfo, chunk []byte) ([]byte, error) {
		a.Segment, a.Contents = seg, chunk
		return a.Marshal(s.Options)
	})
}

func (s *Splitter) split(content []byte, seqID uint32,
	enc func(*SegmentInfo, []byte) ([]byte, error)) ([][]byte, error) {
	budget := s.MaxUserData
	if budget <= 0 {
		budget = DefaultMaxUserData
	}
	if s.Options.Version == V1_1 {
		budget-- // instance-id octet: 1.1 submit/deliver are ops 33/35 (§1.5)
	}
	maxSeg := s.MaxSegments
	if maxSeg <= 0 || maxSeg > MaxSegments {
		maxSeg = MaxSegments
	}
	if len(content) < budget {
		b, err := enc(nil, content)
		if err != nil {
			return nil, err
		}
		if len(b) <= budget {
			return [][]byte{b}, nil
		}
	}
	// Envelope of a segment with no contents; segment values never exceed
	// maxSeg, so this is the largest envelope of any segment.
	hdr, err := enc(&SegmentInfo{First: true, SequenceID: seqID, Value: uint32(maxSeg)}, nil)
	if err != nil {
		return nil, err
	}
	r := ber.NewReader(hdr)
	t, err := r.Next()
	if err != nil {
		return nil, err
	}
	inner := len(t.Content)
	size := func(c int) int { return 1 + ber.LengthSize(inner+c) + inner + c }
	c := budget - inner - 2
	for c > 0 && size(c) > budget {
		c--
	}
	if s.ChunkSize > 0 {
		if s.ChunkSize > c {
			return nil, ErrEnvelopeTooLarge
		}
		c = s.ChunkSize
	}
	if c <= 0 {
		return nil, ErrEnvelopeTooLarge
	}
	n := (len(content) + c - 1) / c
	if n > maxSeg {
		return nil, &SegmentLimitError{Needed: n, Max: maxSeg}
	}
	out := make([][]byte, n)
	for k := range n {
		seg := &SegmentInfo{SequenceID: seqID, Value: uint32(k)}
		if k == 0 {
			seg.First, seg.Value = true, uint32(n)
		}
		b, err := enc(seg, content[k*c:min((k+1)*c, len(content))])
		if err != nil {
			return nil, err
		}
		if len(b) > budget {
			return nil, fmt.Errorf("emsd: internal error: segment %d is %d octets, budget %d", k, len(b), budget)
		}
		out[k] = b
	}
	return out, nil
}

// Reassembly errors; *ReassemblyError wraps one of them together with its
// EMSD error code.
var (
	ErrUnknownSequence  = errors.New("emsd: segment of an unknown (or expired) sequence") // code 7
	ErrSegmentNumber    = errors.New("emsd: segment number out of range")                 // code 7
	ErrDuplicateSegment = errors.New("emsd: duplicate segment")                           // code 7
	ErrSegmentCount     = errors.New("emsd: invalid number of segments")                  // code 7
	ErrTooManyPartial   = errors.New("emsd: too many partial messages")                   // code 6
	ErrReassemblyMemory = errors.New("emsd: reassembly buffer full")                      // code 6
)

// ReassemblyError reports a rejected segment.
type ReassemblyError struct {
	Code       ErrorCode // EMSD error to answer with
	SequenceID uint32
	Segment    uint32 // segment-info value
	Err        error  // one of the ErrXxx reassembly errors
}

func (e *ReassemblyError) Error() string {
	return fmt.Sprintf("emsd: sequence %d segment %d: %v", e.SequenceID, e.Segment, e.Err)
}

// Unwrap returns the code and the cause.
func (e *ReassemblyError) Unwrap() []error { return []error{e.Code, e.Err} }

// ReassemblerConfig bounds a Reassembler. Zero fields take the defaults.
type ReassemblerConfig struct {
	Timeout     time.Duration // from the first segment; default MTSReassemblyTimeout
	MaxPartial  int           // partial messages held at once; default 256
	MaxOctets   int           // octets buffered over all partial messages; default 8 MiB
	MaxSegments int           // segments per message, at most 32 (default)
}

type reasmKey[K comparable] struct {
	from K
	seq  uint32
}

type partial struct {
	env      any // *SubmitArgument or *DeliverArgument of the first segment, Contents nil
	expected uint32
	received uint32
	chunks   [][]byte
	size     int
	deadline time.Time
}

// Reassembler rebuilds segmented Submit/Deliver arguments (§8). Partial
// messages are keyed by a caller-chosen sender key K (e.g. the device's
// address; the reference UA has a single MTS and may use struct{}) plus
// the sequence id. It never returns a partial message, holds no goroutines
// and reads no clock: callers pass the current time. It is safe for
// concurrent use.
type Reassembler[K comparable] struct {
	cfg      ReassemblerConfig
	mu       sync.Mutex
	m        map[reasmKey[K]]*partial
	buffered int
	next     time.Time // earliest deadline, zero if none
}

// NewReassembler returns a Reassembler bounded by cfg.
func NewReassembler[K comparable](cfg ReassemblerConfig) *Reassembler[K] {
	if cfg.Timeout <= 0 {
		cfg.Timeout = MTSReassemblyTimeout
	}
	if cfg.MaxPartial <= 0 {
		cfg.MaxPartial = 256
	}
	if cfg.MaxOctets <= 0 {
		cfg.MaxOctets = 8 << 20
	}
	if cfg.MaxSegments <= 0 || cfg.MaxSegments > MaxSegments {
		cfg.MaxSegments = MaxSegments
	}
	return &Reassembler[K]{cfg: cfg, m: make(map[reasmKey[K]]*partial)}
}

// AddSubmit adds one received SubmitArgument. An unsegmented argument is
// returned as is. For segments it returns nil until the message is
// complete, then the first segment's envelope with Segment nil and the
// concatenated contents. Rejected segments give a *ReassemblyError.
func (r *Reassembler[K]) AddSubmit(now time.Time, from K, a *SubmitArgument) (*SubmitArgument, error) {
	if a.Segment == nil {
		return a, nil
	}
	env := *a
	env.Segment, env.Contents = nil, nil
	got, c, err := r.add(now, from, a.Segment, &env, a.Contents)
	if err != nil || got == nil {
		return nil, err
	}
	out := *got.(*SubmitArgument)
	out.Contents = c
	return &out, nil
}

// AddDeliver is AddSubmit for DeliverArgument.
func (r *Reassembler[K]) AddDeliver(now time.Time, from K, a *DeliverArgument) (*DeliverArgument, error) {
	if a.Segment == nil {
		return a, nil
	}
	env := *a
	env.Segment, env.Contents = nil, nil
	got, c, err := r.add(now, from, a.Segment, &env, a.Contents)
	if err != nil || got == nil {
		return nil, err
	}
	out := *got.(*DeliverArgument)
	out.Contents = c
	return &out, nil
}

func (r *Reassembler[K]) add(now time.Time, from K, seg *SegmentInfo, env any, chunk []byte) (any, []byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.expire(now)
	key := reasmKey[K]{from, seg.SequenceID}
	fail := func(code ErrorCode, err error) (any, []byte, error) {
		return nil, nil, &ReassemblyError{Code: code, SequenceID: seg.SequenceID, Segment: seg.Value, Err: err}
	}
	if seg.First {
		n := seg.Value
		if n == 0 || n > uint32(r.cfg.MaxSegments) {
			return fail(CodeProtocolViolation, ErrSegmentCount)
		}
		// A new first segment restarts the sequence: the sender may have
		// restarted its counter, or re-invoked segment 0.
		if p := r.m[key]; p != nil {
			r.drop(key, p)
		}
		if n == 1 {
			return env, clone(chunk), nil // a single "first" is complete (§8)
		}
		if len(r.m) >= r.cfg.MaxPartial {
			return fail(CodeResource, ErrTooManyPartial)
		}
		if r.buffered+len(chunk) > r.cfg.MaxOctets {
			return fail(CodeResource, ErrReassemblyMemory)
		}
		p := &partial{
			env:      env,
			expected: uint32(1)<<n - 1, // n = 32 wraps to all ones
			received: 1,
			chunks:   make([][]byte, n),
			deadline: now.Add(r.cfg.Timeout),
		}
		p.chunks[0] = clone(chunk)
		p.size = len(chunk)
		r.buffered += len(chunk)
		r.m[key] = p
		if r.next.IsZero() || p.deadline.Before(r.next) {
			r.next = p.deadline
		}
		return nil, nil, nil
	}
	p := r.m[key]
	if p == nil {
		return fail(CodeProtocolViolation, ErrUnknownSequence)
	}
	// A segment continues a message only if its envelope says it is the
	// same message (§8: every segment repeats the first one's envelope):
	// two senders that happen to use one sequence id, or a sender that
	// restarted its counter, must not have their chunks joined.
	if !sameMessage(p.env, env) {
		return fail(CodeProtocolViolation, ErrUnknownSequence)
	}
	k := seg.Value
	if k > 31 || p.expected&(1<<k) == 0 {
		return fail(CodeProtocolViolation, ErrSegmentNumber)
	}
	if p.received&(1<<k) != 0 {
		return fail(CodeProtocolViolation, ErrDuplicateSegment)
	}
	if r.buffered+len(chunk) > r.cfg.MaxOctets {
		// The sender restarts the whole message after an error, so the
		// partial message is of no further use.
		r.drop(key, p)
		return fail(CodeResource, ErrReassemblyMemory)
	}
	p.chunks[k] = clone(chunk)
	p.received |= 1 << k
	p.size += len(chunk)
	r.buffered += len(chunk)
	if p.received != p.expected {
		return nil, nil, nil
	}
	out := make([]byte, 0, p.size)
	for _, c := range p.chunks {
		out = append(out, c...)
	}
	r.drop(key, p)
	return p.env, out, nil
}

// sameMessage reports whether the envelopes of two segments (Segment and
// Contents cleared) name the same message: the same kind of argument,
// content type and, for deliveries, message id and delivery time. The
// security element is left out: a sender need not repeat it.
func sameMessage(a, b any) bool {
	switch a := a.(type) {
	case *SubmitArgument:
		b, ok := b.(*SubmitArgument)
		return ok && a.ContentType == b.ContentType
	case *DeliverArgument:
		b, ok := b.(*DeliverArgument)
		return ok && a.ContentType == b.ContentType && a.MessageID == b.MessageID && a.DeliveryTime == b.DeliveryTime
	}
	return false
}

func (r *Reassembler[K]) drop(key reasmKey[K], p *partial) {
	r.buffered -= p.size
	delete(r.m, key)
}

// expire discards partial messages whose timer has run out (silently, §8).
func (r *Reassembler[K]) expire(now time.Time) int {
	if r.next.IsZero() || now.Before(r.next) {
		return 0
	}
	n := 0
	r.next = time.Time{}
	for k, p := range r.m {
		if !now.Before(p.deadline) {
			r.drop(k, p)
			n++
		} else if r.next.IsZero() || p.deadline.Before(r.next) {
			r.next = p.deadline
		}
	}
	return n
}

// Expire discards the partial messages whose reassembly timer has expired
// at now and returns how many it discarded. Add* also do this.
func (r *Reassembler[K]) Expire(now time.Time) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.expire(now)
}

// Len returns the number of partial messages held.
func (r *Reassembler[K]) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.m)
}

// Buffered returns the number of content octets held.
func (r *Reassembler[K]) Buffered() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buffered
}
