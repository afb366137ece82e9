// Package chatdtest runs a real chatd in-process for the tests of the
// programs and packages built on it (the load tester, the clients, the
// deployment files): one place that knows what a test server needs.
package chatdtest

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/config"
)

// Start runs chatd with the defaults a test needs, then mutate (nil: none)
// applied: data in t.TempDir(), MQTT and HTTP on free loopback ports, a
// 1 MiB disk reserve so that the machine's free space never matters, and
// secret for tokens. It is closed when the test ends.
func Start(t testing.TB, secret []byte, mutate func(*config.Config)) *broker.Server {
	t.Helper()
	cfg := config.Default()
	cfg.DataDir, cfg.Listen, cfg.HTTP = t.TempDir(), "127.0.0.1:0", "127.0.0.1:0"
	cfg.Queue.MinFreeBytes = 1 << 20
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := broker.New(broker.Options{Config: cfg, Secret: secret, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("close chatd: %v", err)
		}
	})
	return s
}
