package ua

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// DefaultVerifyListSize is how many recent submissions the device
// remembers for submission verify, as the reference UA does (§10.1).
const DefaultVerifyListSize = 5

// Config configures a Client.
type Config struct {
	// Server is the MTS address; required for Submit, DeliveryControl and
	// DeliveryVerify.
	Server netip.AddrPort
	// Address is the device's EMSD address, the originator of its
	// messages and the emsd-address of its credentials.
	Address emsd.Address
	// Password is the device's password (at most emsd.MaxPassword
	// octets); "" = none.
	Password string
	// Version is the protocol version the MTS has configured for this
	// device: 1.1 (the zero value) or 1.0 (§1.3). It selects the encoding
	// and operation values of what the client sends; deliveries are
	// accepted in both versions (op 35 = 1.1, op 1 on SAP 3 = 1.0).
	Version emsd.Version
	// PDUSize is the ESRO user-data size (the endpoint's PDUSize, see
	// docs/protocol.md ESRO §6) that segments are sized to (§8). Zero: 1500.
	PDUSize int
	// Handler receives complete deliveries. Nil: deliveries are refused
	// with a transient error (ERROR 6) so that the MTS keeps them queued;
	// submission verify is still answered.
	Handler Handler
	// VerifyList records successful submissions and answers submission
	// verify (§10.4). Nil: an in-memory list of the DefaultVerifyListSize
	// most recent ones.
	VerifyList VerifyList

	// NoDuplicateWindow turns the delivery duplicate window off, as the
	// reference UA has it, for reference MTS peers, which send instance id
	// 0 on every INVOKE (§1.5, Open Point 2). With it on, an op-35 INVOKE
	// whose instance id was seen recently with the same argument octets
	// (a re-invocation) is answered RESULT and not delivered again; a new
	// operation that reuses an id is performed.
	NoDuplicateWindow bool
	// ReferenceSecurity sends credentials as the reference UA does: the
	// password alone, and no security element without a password (§10.2
	// step 3). By default the credentials carry the device's emsd-address
	// and the password (§3 CredentialsSimple), so that the MTS identifies
	// the device whatever its IP address and port.
	ReferenceSecurity bool
	// AcceptReports takes deliveries of delivery and non-delivery reports
	// (content type 2) as Delivery.Report. Without it they are refused
	// with ERROR 7, as the reference UA does, and an MTS in the reference's
	// manner resends them as text notices.
	AcceptReports bool
	// ReverseSequenceOf encodes every SEQUENCE OF last element first, as
	// the reference encoder does (§2.11); meant for byte-exact comparisons.
	ReverseSequenceOf bool

	// ReassemblyTimeout bounds the reassembly of a segmented delivery from
	// its first segment (§8). Zero: 60 s.
	ReassemblyTimeout time.Duration
	// Now is the clock. Nil: time.Now.
	Now func() time.Time
	// Logger receives diagnostics. Nil: slog.Default().
	Logger *slog.Logger
}

// Client is an EMSD user agent on an ESRO endpoint. New binds the UA's
// performer SAPs (3 and 7) on the endpoint; Close releases them. The
// endpoint stays the caller's. All methods are safe for concurrent use.
type Client struct {
	ep       *esro.Endpoint
	cfg      Config
	opts     emsd.Options
	log      *slog.Logger
	verify   VerifyList
	instance emsd.InstanceCounter
	reasm    *emsd.Reassembler[netip.AddrPort] // by MTS socket: two MTSs on one host never meet
	submitMu chan struct{}                     // one submission at a time, see Submit

	seqMu sync.Mutex
	seq   uint32 // last segmentation sequence id used (§8)

	// recvMu serialises deliveries, so that the duplicate window and the
	// handler see them one at a time, in the order the MTS sends them (it
	// has at most one in flight per device, §9.9).
	recvMu sync.Mutex
	dup    emsd.DuplicateWindow
}

// New creates a Client on ep and binds SAP 3 (3-way) and SAP 7 (2-way) to
// receive deliveries and submission verify (§1.2). The endpoint's PDUSize
// must be at least cfg.PDUSize.
func New(ep *esro.Endpoint, cfg Config) (*Client, error) {
	if ep == nil {
		return nil, errors.New("ua: nil endpoint")
	}
	if cfg.PDUSize == 0 {
		cfg.PDUSize = emsd.DefaultMaxUserData
	}
	if cfg.PDUSize < 64 {
		return nil, fmt.Errorf("ua: PDU size %d too small", cfg.PDUSize)
	}
	if len(cfg.Password) > emsd.MaxPassword {
		return nil, fmt.Errorf("ua: password is %d octets, at most %d", len(cfg.Password), emsd.MaxPassword)
	}
	if cfg.Version != emsd.V1_1 && cfg.Version != emsd.V1_0 {
		return nil, fmt.Errorf("ua: %w: %v", emsd.ErrBadVersion, cfg.Version)
	}
	if cfg.ReassemblyTimeout <= 0 {
		cfg.ReassemblyTimeout = emsd.UAReassemblyTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.VerifyList == nil {
		cfg.VerifyList = NewVerifyList(DefaultVerifyListSize)
	}
	if cfg.Server.IsValid() {
		// Its MTS may deliver before the client has invoked anything:
		// answers to it are not limited against reflection.
		ep.Trust(cfg.Server)
	}
	c := &Client{
		ep:       ep,
		cfg:      cfg,
		opts:     emsd.Options{Version: cfg.Version, ReverseSequenceOf: cfg.ReverseSequenceOf},
		log:      cfg.Logger,
		verify:   cfg.VerifyList,
		reasm:    emsd.NewReassembler[netip.AddrPort](emsd.ReassemblerConfig{Timeout: cfg.ReassemblyTimeout}),
		submitMu: make(chan struct{}, 1),
	}
	c.dup.Disabled = cfg.NoDuplicateWindow
	if err := ep.HandleFunc(uint8(emsd.SAPUAPerformer3Way), esro.ThreeWay, c.serve); err != nil {
		return nil, fmt.Errorf("ua: bind SAP 3: %w", err)
	}
	if err := ep.HandleFunc(uint8(emsd.SAPUAPerformer2Way), esro.TwoWay, c.serve); err != nil {
		ep.Unbind(uint8(emsd.SAPUAPerformer3Way))
		return nil, fmt.Errorf("ua: bind SAP 7: %w", err)
	}
	return c, nil
}

// Close unbinds the client's SAPs; invocations being performed end
// without an answer. The endpoint stays open.
func (c *Client) Close() error {
	return errors.Join(c.ep.Unbind(uint8(emsd.SAPUAPerformer3Way)), c.ep.Unbind(uint8(emsd.SAPUAPerformer2Way)))
}

// credentials is the security element the client sends (§3, §10.2).
func (c *Client) credentials() *emsd.SecurityElement {
	if c.cfg.ReferenceSecurity {
		if c.cfg.Password == "" {
			return nil
		}
		return &emsd.SecurityElement{Password: c.cfg.Password}
	}
	return &emsd.SecurityElement{Address: &emsd.EMSDAddress{Address: c.cfg.Address}, Password: c.cfg.Password}
}

// invoke sends one operation to the MTS.
func (c *Client) invoke(ctx context.Context, sap emsd.SAP, op emsd.Operation, hs esro.Handshake, data []byte) (*esro.Result, error) {
	if !c.cfg.Server.IsValid() {
		return nil, ErrNoServer
	}
	wire, ok := op.Wire(c.cfg.Version)
	if !ok {
		return nil, fmt.Errorf("ua: %v does not exist in EMSD %v: %w", op, c.cfg.Version, emsd.ErrBadVersion)
	}
	return c.ep.Invoke(ctx, &esro.Request{
		To: c.cfg.Server, SAP: uint8(sap), Operation: uint8(wire),
		Encoding: esro.EncodingBER, Handshake: hs, Data: data,
	})
}
