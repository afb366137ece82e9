package broker

import (
	"net/http"
	"strings"
	"testing"

	"github.com/chatd/chatd/config"
)

func scrape(t *testing.T, s *Server, path string) (int, string) {
	t.Helper()
	st, b := bearerCall(t, s, http.MethodGet, path, "", "")
	return st, string(b)
}

func TestMetricsAndHealth(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Receipts.Delivered = false })
	if code, body := scrape(t, s, "/healthz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Fatalf("healthz: %d %q", code, body)
	}
	if code, body := scrape(t, s, "/cluster/status"); code != 404 || !strings.Contains(body, "not_clustered") {
		t.Fatalf("cluster status of a node alone: %d %q, want 404 not_clustered", code, body)
	}
	alice := mustDial(t, s, "alice", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice.send("bob", "m-1", "")
	bob.waitFor(1)
	waitAcked(t, s, "bob", "")
	alice.publish("nowhere", []byte(`{"id":"x"}`))
	alice.waitFor(1)

	_, body := scrape(t, s, "/metrics")
	for _, want := range []string{
		"chatd_connections 2",
		"chatd_connects_total 2",
		"chatd_messages_stored_total 2", // bob's message and alice's error event
		"chatd_messages_sent_total 2",
		`chatd_refusals_total{code="bad_topic"} 1`,
		"chatd_commit_seconds_count",
		"chatd_delivery_seconds_count",
		"chatd_disk_bytes",
		"go_goroutines",
		`chatd_build_info{commit="`,
		`go_version="go1.`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", body)
	}
}
