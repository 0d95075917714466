package server

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/esro-emsdp/emsdp/ua"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

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
	var in, out int
	for _, line := range strings.Split(buf.String(), "\n") {
		var r struct{ Level, Msg, Dir, Peer, PDU string }
		if json.Unmarshal([]byte(line), &r) != nil || r.Msg != "pdu" {
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
	if in != 1 || out != 1 {
		t.Errorf("traced %d submissions in and %d results out, want 1 and 1:\n%s", in, out, buf.String())
	}
	if strings.Contains(buf.String(), "Very-Secret") {
		t.Error("the password is in the log")
	}
}
