package server

import (
	"context"
	"encoding/json"
	"log/slog"
	"regexp"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/ua"
)

// log_level = "trace" logs every PDU in and out, decoded, with the peer as
// ip:port and the password masked; the level is named TRACE.
func TestTraceLog(t *testing.T) {
	var buf lockedBuffer
	c := testConfig(t)
	c.LogLevel, c.LogFormat = "trace", LogJSON
	level := new(slog.LevelVar)
	log := slog.New(c.NewLogHandler(&buf, &slog.HandlerOptions{Level: level}))
	s := startServerWith(t, c, Options{Logger: log, LogLevel: level})
	dev := newDevice(t, s, 198036, deviceOpts{password: "Very-Secret"})
	_, err := dev.ua.Submit(context.Background(), &ua.Message{To: []string{"x@example.com"}, Subject: "Traced", Body: []byte("b\n")})
	must(t, err)
	peer := epAddr(dev.ep).String()
	var in, out, logged int
	for _, line := range strings.Split(buf.String(), "\n") {
		var r struct{ Level, Msg, Dir, Peer, PDU, Device, ID string }
		if json.Unmarshal([]byte(line), &r) != nil {
			continue
		}
		if r.Msg == "submission" {
			// The identifiers of the CLI and emsdp queue, not numbers.
			if r.Device != "198.036" || !regexp.MustCompile(`^[0-9a-f]{8}\.[0-9a-f]{8}$`).MatchString(r.ID) {
				t.Errorf("submission log line %s", line)
			}
			logged++
		}
		if r.Msg != "pdu" {
			continue
		}
		if r.Level != "TRACE" || r.Peer != peer {
			t.Errorf("trace line %s", line)
		}
		switch {
		case r.Dir == "in" && strings.HasPrefix(r.PDU, "INVOKE sap=5") && strings.Contains(r.PDU, "password ********") &&
			strings.Contains(r.PDU, `subject: "Traced"`):
			in++
		case r.Dir == "out" && strings.HasPrefix(r.PDU, "RESULT") && strings.Contains(r.PDU, "SubmitResult"):
			out++
		}
	}
	if logged != 1 {
		t.Errorf("%d submission log lines, want 1", logged)
	}
	if in != 1 || out != 1 {
		t.Errorf("traced %d submissions in and %d results out, want 1 and 1:\n%s", in, out, buf.String())
	}
	if strings.Contains(buf.String(), "Very-Secret") {
		t.Error("the password is in the log")
	}
}
