package natsnode

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"

	"github.com/nats-io/nats.go/jetstream"
)

// TestQueueSyncReachesJetStream starts an embedded server for each
// fsync setting queue.sync maps to and checks the fsync settings the running JetStream
// took and logs, and that it stores a message with them.
func TestQueueSyncReachesJetStream(t *testing.T) {
	verifyNoLeaks(t)
	cases := []struct {
		always       bool
		interval     time.Duration
		wantAlways   bool
		wantInterval time.Duration
	}{
		{true, 0, true, DefaultSyncInterval},
		{false, 100 * time.Millisecond, false, 100 * time.Millisecond},
		{false, 3 * time.Second, false, 3 * time.Second},
		{false, 0, false, DefaultSyncInterval},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("always=%v/%v", c.always, c.interval), func(t *testing.T) {
			var logs testutil.SyncBuffer
			cfg := Config{Name: "sync", Dir: t.TempDir(), Listen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(&logs, nil))}
			cfg.SyncAlways, cfg.SyncInterval = c.always, c.interval
			n, err := Start(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer n.Shutdown()
			jsc := n.Server().JetStreamConfig()
			if jsc == nil {
				t.Fatal("no JetStream config on the running server")
			}
			if jsc.SyncAlways != c.wantAlways || jsc.SyncInterval != c.wantInterval {
				t.Fatalf("JetStream runs with sync_always=%v sync_interval=%v, want %v %v",
					jsc.SyncAlways, jsc.SyncInterval, c.wantAlways, c.wantInterval)
			}
			// The operator can read the effective settings in the start-up log.
			want := fmt.Sprintf(`msg="JetStream fsync" sync_always=%v sync_interval=%v`, c.wantAlways, c.wantInterval)
			if !strings.Contains(logs.String(), want) {
				t.Fatalf("start-up log lacks %s", want)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := n.JetStream().CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}}); err != nil {
				t.Fatal(err)
			}
			if ack, err := n.JetStream().Publish(ctx, "s.a", []byte("x")); err != nil || ack.Sequence != 1 {
				t.Fatalf("publish: %+v, %v", ack, err)
			}
		})
	}
}

// TestJoinByURLWarnsSyncIsTheServers checks that joining an external
// NATS says at start-up that its fsync is not queue.sync's to set.
func TestJoinByURLWarnsSyncIsTheServers(t *testing.T) {
	verifyNoLeaks(t)
	existing, err := Start(context.Background(), Config{Name: "existing", Dir: t.TempDir(), Listen: "127.0.0.1:0", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer existing.Shutdown()
	var logs testutil.SyncBuffer
	cfg := Config{URL: existing.ClientURL(), Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	cfg.SyncInterval = 100 * time.Millisecond
	joined, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer joined.Shutdown()
	var warning string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "level=WARN") && strings.Contains(l, "sync_interval") {
			warning = l
		}
	}
	if warning == "" {
		t.Fatalf("no warning that the joined server's sync_interval applies; logs:\n%s", logs.String())
	}
	if !strings.Contains(warning, "queue.sync") || !strings.Contains(warning, existing.ClientURL()[len("nats://"):]) {
		t.Fatalf("warning does not name queue.sync and the server: %s", warning)
	}
}
