package ua

import (
	"log/slog"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testLogger discards diagnostics: the tests assert behaviour, and the
// lossy-network tests would otherwise log every retry.
func testLogger(testing.TB) *slog.Logger { return slog.New(slog.DiscardHandler) }
