package esro

import "sync/atomic"

// DropReason says why a received datagram was discarded without effect.
type DropReason uint8

// Drop reasons.
const (
	DropEmpty            DropReason = iota // empty datagram
	DropBadType                            // PDU type 5–7
	DropShort                              // shorter than its header
	DropSAPMismatch                        // INVOKE reusing a live (peer, ref) on another SAP
	DropUnmatchedAck                       // ACK for no performer awaiting one
	DropUnmatchedFailure                   // FAILURE for no invocation awaiting a reply
	DropUnexpected                         // a PDU with no transition in the invocation's state
	DropClosing                            // INVOKE while shutting down
	DropUnprovenLimit                      // INVOKE from an unproven source beyond its caps
	numDropReasons
)

var dropNames = [numDropReasons]string{"empty", "bad_type", "short", "sap_mismatch", "unmatched_ack", "unmatched_failure", "unexpected", "closing", "unproven_limit"}

func (d DropReason) String() string {
	if d < numDropReasons {
		return dropNames[d]
	}
	return "unknown"
}

// numReasons counts failure values 0..3 plus one bucket for anything larger.
const numReasons = 5

func reasonIndex(r FailureReason) int {
	if r > RemoteResource {
		return numReasons - 1
	}
	return int(r)
}

// Stats is a snapshot of an Endpoint's counters and gauges. Counters only
// grow; InFlight values are current.
type Stats struct {
	DatagramsReceived, DatagramsSent uint64
	BytesReceived, BytesSent         uint64
	SendErrors                       uint64

	InvokesSent     uint64 // new invocations started by Invoke
	InvokesReceived uint64 // INVOKE.indications given to handlers
	ResultsReceived uint64 // first RESULT of an invocation
	ErrorsReceived  uint64 // first ERROR of an invocation
	AnswersSent     uint64 // first RESULT/ERROR sent per invocation
	Confirms        uint64 // RESULT/ERROR.confirm on the performer side

	Retransmissions uint64 // timer-driven resends of INVOKE, RESULT or ERROR
	DuplicatesIn    uint64 // duplicate INVOKE, RESULT, ERROR or ACK absorbed or re-answered
	Superseded      uint64 // held performer invocations replaced by a new INVOKE on their number
	Drops           [numDropReasons]uint64

	// By failure value 0..3; index 4 counts any larger value.
	FailuresSent     [numReasons]uint64 // FAILURE PDUs sent
	FailuresReceived [numReasons]uint64 // FAILURE PDUs that ended an invocation
	LocalFailures    [numReasons]uint64 // FAILURE.indications raised locally

	InFlightInvoker   int // invoker invocations held, including reference hold
	InFlightPerformer int // performer invocations held, including reference hold
	ReferenceWaits    uint64

	// Withheld counts the datagrams (and WithheldBytes their octets) the
	// amplification limit kept from unproven sources (hostile.go).
	Withheld, WithheldBytes uint64
	// InFlightUnproven are the performer invocations from unproven
	// sources held; Tombstones the refused ones remembered for duplicate
	// detection only.
	InFlightUnproven, Tombstones int
	// Unreachable counts invocations ended early by an ICMP error.
	Unreachable uint64
	// KernelDrops is the socket's count of datagrams the kernel dropped
	// for want of receive buffer (Linux SO_RXQ_OVFL), as last reported.
	KernelDrops uint64
	// SocketCalls counts the system calls made on the socket to move
	// datagrams (reads, including those that found nothing waiting, and
	// writes), where the endpoint makes them itself (Linux UDP sockets);
	// zero elsewhere.
	SocketCalls uint64
	// RetransmissionsDeferred counts retransmissions that waited for a
	// slot of Config.RetransmitRate (each went out then, unless its
	// invocation ended first).
	RetransmissionsDeferred uint64
}

// counters are updated under the machine's lock but read without it.
type counters struct {
	datagramsIn, datagramsOut, bytesIn, bytesOut, sendErrors  atomic.Uint64
	invokesOut, invokesIn, results, errors, answers, confirms atomic.Uint64
	retransmissions, duplicates, superseded                   atomic.Uint64
	drops                                                     [numDropReasons]atomic.Uint64
	failuresOut, failuresIn, localFailures                    [numReasons]atomic.Uint64
	inflightInv, inflightPerf                                 atomic.Int64
	refWaits                                                  atomic.Uint64
	withheld, withheldBytes, unreachable, kernelDrops         atomic.Uint64
	unproven, tombstones                                      atomic.Int64
	socketCalls                                               atomic.Uint64
	retxDeferred                                              atomic.Uint64
}

func (c *counters) snapshot() Stats {
	s := Stats{
		DatagramsReceived: c.datagramsIn.Load(), DatagramsSent: c.datagramsOut.Load(),
		BytesReceived: c.bytesIn.Load(), BytesSent: c.bytesOut.Load(), SendErrors: c.sendErrors.Load(),
		InvokesSent: c.invokesOut.Load(), InvokesReceived: c.invokesIn.Load(),
		ResultsReceived: c.results.Load(), ErrorsReceived: c.errors.Load(),
		AnswersSent: c.answers.Load(), Confirms: c.confirms.Load(),
		Retransmissions: c.retransmissions.Load(), DuplicatesIn: c.duplicates.Load(), Superseded: c.superseded.Load(),
		InFlightInvoker: int(c.inflightInv.Load()), InFlightPerformer: int(c.inflightPerf.Load()),
		ReferenceWaits: c.refWaits.Load(),
		Withheld:       c.withheld.Load(), WithheldBytes: c.withheldBytes.Load(),
		InFlightUnproven: int(c.unproven.Load()), Tombstones: int(c.tombstones.Load()),
		Unreachable: c.unreachable.Load(), KernelDrops: c.kernelDrops.Load(), SocketCalls: c.socketCalls.Load(),
	}
	s.RetransmissionsDeferred = c.retxDeferred.Load()
	for i := range s.Drops {
		s.Drops[i] = c.drops[i].Load()
	}
	for i := range numReasons {
		s.FailuresSent[i] = c.failuresOut[i].Load()
		s.FailuresReceived[i] = c.failuresIn[i].Load()
		s.LocalFailures[i] = c.localFailures[i].Load()
	}
	return s
}
