package emsd

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// Logs show addresses and message ids as the CLI does, in JSON too.
func TestLogValues(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("x", "device", Address(198036), "id", LocalMessageID{SubmissionTime: 0x6b17127c, Number: 3},
		"msg_id", LocalID(0x6b17127c, 4), "rfc", RFC822ID("<a@b>"))
	for _, want := range []string{`"device":"198.036"`, `"id":"6b17127c.00000003"`, `"msg_id":"6b17127c.00000004"`, `"rfc":"<a@b>"`} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("JSON log lacks %s: %s", want, buf.String())
		}
	}
}
