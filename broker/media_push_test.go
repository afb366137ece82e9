package broker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

func TestMediaThroughTheServer(t *testing.T) {
	var clock testClock
	s := startServerAt(t, t.TempDir(), clock.Now, func(c *config.Config) {
		c.Media.MaxBytes = 1 << 20
		c.Media.TTL = time.Second
	})
	base := "http://" + s.HTTPAddr() + "/v1/media"
	do := func(method, url, user string, body []byte, hdr map[string]string) *http.Response {
		t.Helper()
		req, err := http.NewRequest(method, url, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if user != "" {
			req.Header.Set("Authorization", "Bearer "+mint(t, user))
		}
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	photo := bytes.Repeat([]byte("0123456789"), 1000)
	resp := do("POST", base, "alice", photo, map[string]string{"Content-Type": "image/jpeg"})
	var up struct {
		ID     string `json:"id"`
		Size   int64  `json:"size"`
		SHA256 string `json:"sha256"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&up); err != nil || resp.StatusCode != 201 || up.Size != int64(len(photo)) || len(up.ID) < 32 {
		t.Fatalf("upload: %d %+v %v", resp.StatusCode, up, err)
	}
	// Any authenticated user who knows the id may fetch it, in ranges too.
	resp = do("GET", base+"/"+up.ID, "bob", nil, map[string]string{"Range": "bytes=10-19"})
	got, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 206 || string(got) != "0123456789" || resp.Header.Get("Content-Type") != "image/jpeg" {
		t.Fatalf("range: %d %q %s", resp.StatusCode, got, resp.Header.Get("Content-Type"))
	}
	if resp := do("GET", base+"/"+up.ID, "", nil, nil); resp.StatusCode != 401 {
		t.Fatalf("without a token: %d", resp.StatusCode)
	}
	if resp := do("POST", base, "alice", make([]byte, 1<<20+1), nil); resp.StatusCode != 413 {
		t.Fatalf("over media.max_bytes: %d", resp.StatusCode)
	}
	clock.Advance(1100 * time.Millisecond) // past media.ttl
	if resp := do("GET", base+"/"+up.ID, "bob", nil, nil); resp.StatusCode != 404 {
		t.Fatalf("after media.ttl: %d", resp.StatusCode)
	}
}

// pushHook records push notifications; it fails the first failFirst requests.
type pushHook struct {
	mu        sync.Mutex
	bodies    []map[string]any
	attempts  int
	failFirst int
	signal    chan struct{}
}

func (w *pushHook) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(rw, err.Error(), 400)
		return
	}
	w.mu.Lock()
	w.attempts++
	fail := w.attempts <= w.failFirst
	if !fail {
		w.bodies = append(w.bodies, body)
	}
	w.mu.Unlock()
	if fail {
		http.Error(rw, "try later", 500)
		return
	}
	select {
	case w.signal <- struct{}{}:
	default:
	}
}

func (w *pushHook) waitFor(t *testing.T, n int) []map[string]any {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		w.mu.Lock()
		if len(w.bodies) >= n {
			out := append([]map[string]any(nil), w.bodies...)
			w.mu.Unlock()
			return out
		}
		w.mu.Unlock()
		select {
		case <-w.signal:
		case <-time.After(10 * time.Millisecond):
		case <-deadline:
			t.Fatalf("webhook got %d notifications, want %d", len(w.bodies), n)
		}
	}
}

func TestPushWebhook(t *testing.T) {
	hook := &pushHook{failFirst: 1, signal: make(chan struct{}, 1)}
	srv := httptest.NewServer(hook)
	defer srv.Close()
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Push.Webhook = srv.URL
		c.Push.Interval = time.Hour
	})
	bob := mustDial(t, s, "bob", phoneOpt{})
	bob.client.Disconnect(100)
	testutil.Eventually(t, 10*time.Second, func() bool { return !fed(s, "bob") }, "bob's disconnect never reached the server")
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	alice.send("bob", "m-1", `,"text":"secret"`)
	got := hook.waitFor(t, 1)[0]
	want := map[string]any{"user": "bob", "from": "alice", "kind": "msg", "queued": float64(1)}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("notification %v, want %v", got, want)
		}
	}
	if _, leaked := got["text"]; leaked || strings.Contains(srvBody(got), "secret") {
		t.Fatalf("notification carries the message: %v", got)
	}
	hook.mu.Lock()
	attempts := hook.attempts
	hook.mu.Unlock()
	if attempts != 2 {
		t.Fatalf("webhook saw %d attempts, want a retry after the 500", attempts)
	}
	// At most one per push.interval per user.
	alice.send("bob", "m-2", "")
	// The PUBACK goes out before the push is considered: wait for it.
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if st := s.push.Stats(); st.Suppressed != 1 {
			return fmt.Errorf("push stats %+v", st)
		}
		return nil
	}, "second message within the interval not suppressed")
	// The webhook records a body before the notifier counts it as sent.
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if st := s.push.Stats(); st.Sent != 1 {
			return fmt.Errorf("push stats %+v", st)
		}
		return nil
	}, "first notification never counted as sent")
	// An online user is not pushed.
	carol := mustDial(t, s, "carol", phoneOpt{})
	alice.send("carol", "m-3", "")
	carol.waitFor(1)
	if st := s.push.Stats(); st.Sent != 1 || st.Suppressed != 1 {
		t.Fatalf("push for an online user: %+v", st)
	}
}

func srvBody(m map[string]any) string {
	b, _ := json.Marshal(m)
	return string(b)
}

// fed reports whether the bare device of user is being fed.
func fed(s *Server, user string) bool {
	_, _, ok := s.path.Window(user, "")
	return ok
}
