package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestSendListen runs the program against a real chatd: alice sends
// while bob listens and marks it read; the usage errors exit 2.
func TestSendListen(t *testing.T) {
	secret := []byte(strings.Repeat("c", 32))
	cfg := config.Default()
	cfg.DataDir, cfg.Listen, cfg.HTTP = t.TempDir(), "127.0.0.1:0", ""
	cfg.Queue.MinFreeBytes = 1 << 20
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
			t.Error(err)
		}
	})
	mint := func(user string) string {
		tok, err := token.Mint(secret, user, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	server := "mqtt://" + s.MQTTAddr()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var out, errs bytes.Buffer
	if code := run(ctx, []string{"--server", server, "--user", "alice", "--token", mint("alice"), "send", "bob", "hello from a script"}, &out, &errs); code != 0 {
		t.Fatalf("send: exit %d, %s", code, errs.String())
	}
	if !strings.HasPrefix(out.String(), "stored ") {
		t.Errorf("send printed %q, want stored ID", out.String())
	}

	out.Reset()
	if code := run(ctx, []string{"--server", server, "--user", "bob", "--token", mint("bob"), "listen", "--read", "--count", "1"}, &out, &errs); code != 0 {
		t.Fatalf("listen: exit %d, %s", code, errs.String())
	}
	var line struct {
		Event string
		Data  struct {
			From string
			Msg  struct{ Text string }
		}
	}
	if err := json.Unmarshal(out.Bytes(), &line); err != nil || line.Event != "Message" || line.Data.From != "alice" || line.Data.Msg.Text != "hello from a script" {
		t.Errorf("listen printed %q (%v), want alice's message", out.String(), err)
	}

	for _, args := range [][]string{
		{"send", "bob", "no user"},
		{"--user", "alice", "--token", "t", "send", "bob"},
		{"--user", "alice", "--token", "t", "shout"},
		{"--no-such-flag"},
	} {
		if code := run(ctx, args, io.Discard, io.Discard); code != 2 {
			t.Errorf("chatcli %v: exit %d, want 2", args, code)
		}
	}
}
