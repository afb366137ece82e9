package badgerq_test

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/broker/queue/queuetest"
)

// badger is the Badger store as a conformance-suite backend: a data
// directory per run, kept across a crash.
func badger(t testing.TB) queuetest.Backend {
	root := t.TempDir()
	return queuetest.Backend{
		Name: "badger",
		Open: func(t testing.TB, run string, q queue.Settings, now func() time.Time, deleted queue.DeletedFunc) queuetest.Store {
			s, err := badgerq.Open(badgerq.Options{
				Dir: filepath.Join(root, run), Settings: q, Sync: badgerq.SyncNone, MinFreeBytes: 256 << 20, Now: now, OnDeleted: deleted,
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			})
			if err != nil {
				t.Fatalf("open queue: %v", err)
			}
			return s
		},
		Crash:  func(s queuetest.Store) error { return badgerq.Crash(s.(*badgerq.Store)) },
		Remove: func(run string) { _ = os.RemoveAll(filepath.Join(root, run)) },
	}
}

func TestConformance(t *testing.T) {
	queuetest.RunExamples(t, badger(t))
}

// TestModel runs the model-based test of the message path on Badger;
// -seeds, -seed and -replay choose the sequences.
func TestModel(t *testing.T) {
	queuetest.RunModel(t, badger(t))
}

// FuzzModel feeds the model-based test the fuzzer's event sequences:
//
//	go test -run '^$' -fuzz FuzzModel -fuzzminimizetime 0 -parallel 1 ./broker/queue/badgerq/
//
// (minimizing replays each new input for a minute by default, which
// stalls a fuzzer this slow per input).
func FuzzModel(f *testing.F) {
	queuetest.FuzzModel(f, badger(f))
}
