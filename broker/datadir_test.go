package broker

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/chatd/chatd/config"
)

func newAt(t *testing.T, dir string) (*Server, error) {
	t.Helper()
	cfg := config.Default()
	cfg.DataDir = dir
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	return New(Options{Config: cfg, Secret: testSecret, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
}

func TestSecondServerOnSameDataDirIsRefused(t *testing.T) {
	dir := t.TempDir()
	startServer(t, dir, nil)
	s, err := newAt(t, dir)
	if err == nil {
		stopServer(t, s)
		t.Fatal("a second server opened a data dir in use")
	}
	if !strings.Contains(err.Error(), "queue") || !strings.Contains(strings.ToLower(err.Error()), "lock") {
		t.Fatalf("unclear refusal: %v", err)
	}
}

func TestCorruptDataDirIsRefused(t *testing.T) {
	cases := []struct {
		name  string
		setup func(t *testing.T, queueDir string)
	}{
		{"foreign files", func(t *testing.T, q string) {
			if err := os.WriteFile(filepath.Join(q, "MANIFEST"), []byte("this is not a badger manifest"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		// A torn tail is what a crash leaves and Badger repairs it; a damaged
		// header is not.
		{"damaged manifest header", func(t *testing.T, q string) {
			b, err := os.ReadFile(filepath.Join(q, "MANIFEST"))
			if err != nil {
				t.Fatal(err)
			}
			copy(b, "garbage!")
			if err := os.WriteFile(filepath.Join(q, "MANIFEST"), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			q := filepath.Join(dir, queueDir)
			if c.name == "foreign files" {
				if err := os.MkdirAll(q, 0o700); err != nil {
					t.Fatal(err)
				}
			} else {
				s := startServer(t, dir, nil)
				stopServer(t, s)
			}
			c.setup(t, q)
			s, err := newAt(t, dir)
			if err == nil {
				stopServer(t, s)
				t.Fatal("a corrupt data dir was accepted")
			}
			if !strings.Contains(err.Error(), "open queue "+q) {
				t.Fatalf("the refusal does not name the queue dir: %v", err)
			}
		})
	}
}
