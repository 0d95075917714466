package store

import "time"

// SubmissionState is the life cycle of a submission (docs/protocol.md EMSD §9.5):
// pending from commit until the RESULT is confirmed (or verified), then
// released (its deliveries and relays exist) or dropped.
type SubmissionState string

// Submission states.
const (
	SubmissionPending  SubmissionState = "pending"
	SubmissionReleased SubmissionState = "released"
	SubmissionDropped  SubmissionState = "dropped"
)

// Submission is a message submitted by a device.
type Submission struct {
	ID          int64 // assigned by AddSubmission
	Device      uint32
	InstanceID  uint8
	ContentHash []byte // dedupe key with Device and InstanceID
	ContentType uint32
	Content     []byte
	Received    time.Time
	// LocalTime and Number form the local message id (docs/protocol.md EMSD §6.3),
	// assigned by AddSubmission: LocalTime is Received in seconds, Number
	// comes from a persistent counter, so the pair never repeats.
	LocalTime uint32
	Number    uint32
	State     SubmissionState
	Verify    string // how a pending submission was resolved: "confirmed", "send", "drop", "failure", "restart"
}
