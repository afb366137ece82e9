package broker

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// servedCert returns the SHA-256 of the certificate s's TLS listener
// presents to a new connection.
func servedCert(t *testing.T, s *Server) string {
	t.Helper()
	// Only the certificate is read: it need not be trusted.
	c, err := tls.Dial("tcp", s.TLSAddr(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sum := sha256.Sum256(c.ConnectionState().PeerCertificates[0].Raw)
	return hex.EncodeToString(sum[:])
}

// TestReload changes a running node's configuration: the certificate
// renewed in place is served to new connections, the push webhook moves,
// a lower cap on connections refuses the next one; what needs a restart
// is named and keeps its value; an invalid configuration changes nothing.
func TestReload(t *testing.T) {
	certs := testutil.Certs(t)
	var hits [2]atomic.Int64
	hooks := [2]string{}
	for i := range hooks {
		hooks[i] = testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) { hits[i].Add(1) }).URL
	}
	var cfg config.Config
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.TLS = config.TLS{Listen: "127.0.0.1:0", CertFile: certs.CertFile, KeyFile: certs.KeyFile}
		c.Push.Webhook = hooks[0]
		c.Push.Interval = time.Millisecond
		cfg = *c
	})
	before := servedCert(t, s)

	// Renewed in place: same files, new certificate; the rest as it was.
	renewed := testutil.Certs(t)
	for _, f := range [][2]string{{renewed.CertFile, certs.CertFile}, {renewed.KeyFile, certs.KeyFile}} {
		b, err := os.ReadFile(f[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f[1], b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	next := cfg
	next.Push.Webhook = hooks[1]
	next.Limits.MaxConnectionsPerUser = 1
	next.Log.Level = "debug"
	next.Listen = "127.0.0.1:0" // unchanged value: not named
	next.Queue.MessageTTL = time.Hour
	next.Events.Webhook = hooks[0] // was off: a restart turns it on
	next.Events.Secret = strings.Repeat("s", 32)
	got, err := s.Reload(next)
	if err != nil {
		t.Fatal(err)
	}
	wantApplied := []string{"push.webhook", "limits.max_connections_per_user", "log.level"}
	wantRestart := []string{"queue.message_ttl", "events.webhook", "events.secret"}
	slices.Sort(got.Applied)
	slices.Sort(got.Restart)
	slices.Sort(wantApplied)
	slices.Sort(wantRestart)
	if !slices.Equal(got.Applied, wantApplied) || !slices.Equal(got.Restart, wantRestart) || !got.Certificate {
		t.Fatalf("reload: %+v, want applied %v, restart %v and the certificate read", got, wantApplied, wantRestart)
	}
	if after := servedCert(t, s); after == before {
		t.Errorf("the renewed certificate is not served: %s both times", after)
	}

	// The push webhook moved.
	bob := mustDial(t, s, "bob", phoneOpt{})
	bob.client.Disconnect(100)
	testutil.Eventually(t, 10*time.Second, func() bool { return !fed(s, "bob") }, "bob's disconnect never reached the server")
	alice := mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone", noSub: true})
	alice.send("bob", "m-1", "")
	testutil.Eventually(t, 10*time.Second, func() bool { return hits[1].Load() == 1 }, "no push to the new webhook")
	if n := hits[0].Load(); n != 0 {
		t.Errorf("the old webhook got %d pushes", n)
	}

	// One connection per user now: alice's second device is refused.
	if _, err := dial(t, s, "alice", phoneOpt{clientID: "alice/laptop", noSub: true}); err == nil {
		t.Error("a second connection of alice was let in past max_connections_per_user 1")
	}

	// What waits for a restart is named again by the next reload; an
	// invalid configuration changes nothing.
	if again, err := s.Reload(next); err != nil || len(again.Applied) != 0 || !slices.Equal(slices.Sorted(slices.Values(again.Restart)), wantRestart) {
		t.Errorf("second reload: %+v %v, want nothing applied and %v still waiting", again, err, wantRestart)
	}
	bad := next
	bad.Queue.Sync = "sometimes"
	if _, err := s.Reload(bad); err == nil || !strings.Contains(err.Error(), "queue.sync") {
		t.Errorf("an invalid configuration: %v, want refused naming queue.sync", err)
	}
	// TLS turned off: it waits for a restart, and the rest is applied.
	off := next
	off.TLS = config.TLS{}
	off.Limits.PublishRate = 7
	if got, err := s.Reload(off); err != nil || !slices.Contains(got.Restart, "tls.listen") || !slices.Contains(got.Applied, "limits.publish_rate") || got.Certificate {
		t.Errorf("reload turning TLS off: %+v %v, want TLS waiting for a restart and the rate applied", got, err)
	}
	missing := next
	missing.TLS.CertFile = certs.CertFile + ".gone"
	if _, err := s.Reload(missing); err == nil {
		t.Error("a certificate file that is gone was accepted")
	}
	if after := servedCert(t, s); after == before {
		t.Error("a refused reload changed the certificate back")
	}
}
