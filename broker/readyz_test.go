package broker

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// readiness GETs /readyz from s.
func readiness(t *testing.T, s *Server) (int, Readiness) {
	t.Helper()
	code, body := scrape(t, s, "/readyz")
	var r Readiness
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatalf("readyz %d %q: %v", code, body, err)
	}
	return code, r
}

// TestReadyz: a node is ready unless it is shutting down or short of disk;
// /healthz says it is alive either way.
func TestReadyz(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*config.Config)
		stop   bool
		want   string // a reason; "" for ready
	}{
		{name: "ready"},
		{name: "disk under its reserve", mutate: func(c *config.Config) { c.Queue.MinFreeBytes = 1 << 62 }, want: "disk"},
		{name: "shutting down", stop: true, want: "shutting down"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, t.TempDir(), tt.mutate)
			if tt.stop {
				// Close answers the probes it is serving and then stops
				// the listener: the flag it sets first is what they see.
				s.stopping.Store(true)
				t.Cleanup(func() { s.stopping.Store(false) })
			}
			code, r := readiness(t, s)
			if tt.want == "" {
				if code != 200 || !r.Ready || len(r.Reasons) != 0 {
					t.Fatalf("readyz: %d %+v, want 200 ready", code, r)
				}
				return
			}
			if code != 503 || r.Ready || len(r.Reasons) != 1 || !strings.Contains(r.Reasons[0], tt.want) {
				t.Fatalf("readyz: %d %+v, want 503 for %s", code, r, tt.want)
			}
			if code, _ := scrape(t, s, "/healthz"); code != 200 {
				t.Errorf("healthz of a node not ready: %d, want 200", code)
			}
		})
	}
}

// TestClusterReadyz: a cluster node is ready, and chatd_cluster_quorum
// 1, while JetStream has a quorum, and neither once two of three nodes
// are gone.
func TestClusterReadyz(t *testing.T) {
	nodes := startTestCluster(t, 3)
	testutil.EventuallyNoError(t, 20*time.Second, func() error {
		if code, r := readiness(t, nodes[0]); code != 200 {
			return fmt.Errorf("readyz %d: %+v", code, r)
		}
		return nil
	}, "node 1 never ready")
	if _, body := scrape(t, nodes[0], "/metrics"); !strings.Contains(body, "\nchatd_cluster_quorum 1\n") {
		t.Errorf("metrics lack chatd_cluster_quorum 1 with a quorum")
	}
	stopServer(t, nodes[1])
	stopServer(t, nodes[2])
	testutil.EventuallyNoError(t, 30*time.Second, func() error {
		code, r := readiness(t, nodes[0])
		if code != 503 || len(r.Reasons) == 0 || !strings.Contains(r.Reasons[0], "cluster") {
			return fmt.Errorf("readyz %d: %+v", code, r)
		}
		return nil
	}, "node 1 ready without a quorum")
	if _, body := scrape(t, nodes[0], "/metrics"); !strings.Contains(body, "\nchatd_cluster_quorum 0\n") {
		t.Errorf("metrics lack chatd_cluster_quorum 0 without a quorum")
	}
}
