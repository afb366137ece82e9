package queue_test

import (
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/queuetest"
	"github.com/chatd/chatd/config"
)

// badger is the Badger store as a conformance-suite backend: a data
// directory per run, kept across a crash.
func badger(t *testing.T) queuetest.Backend {
	root := t.TempDir()
	return queuetest.Backend{
		Name: "badger",
		Open: func(t testing.TB, run string, q config.Queue, now func() time.Time, onStored func(string, queue.Message)) queuetest.Store {
			s, err := queue.Open(queue.Options{
				Dir: filepath.Join(root, run), Queue: q, Now: now, OnStored: onStored,
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			})
			if err != nil {
				t.Fatalf("open queue: %v", err)
			}
			return s
		},
		Crash: func(s queuetest.Store) error { return queue.Crash(s.(*queue.Store)) },
	}
}

func TestConformance(t *testing.T) {
	queuetest.Run(t, badger(t))
}
