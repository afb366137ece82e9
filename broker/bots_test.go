package broker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/bots"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// echoBot is a bot's webhook that answers each message with the server
// API's send call: "echo: " and the text, to the sender, as the bot.
type echoBot struct {
	t  *testing.T
	mu sync.Mutex
	// api is the server the answers go to, and key its API key; set once
	// the server runs.
	api, key string
	// down makes the webhook answer 503.
	down bool
	// got lists the ids of the messages taken, in order; nodes the
	// nodes that sent them.
	got   []string
	nodes []string
	URL   string
}

func newEchoBot(t *testing.T) *echoBot {
	b := &echoBot{t: t}
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("read bot request: %v", err)
			return
		}
		if err := events.Verify(r.Header, []byte(eventsSecret), body, time.Now(), time.Minute); err != nil {
			t.Errorf("bot request %s: %v", body, err)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var req bots.Request
		var env struct {
			Kind, From string
			Msg        struct{ ID, Text string }
		}
		if err := json.Unmarshal(body, &req); err != nil || json.Unmarshal(req.Message, &env) != nil {
			t.Errorf("bot request %s: %v", body, err)
			return
		}
		b.mu.Lock()
		down, api, key := b.down, b.api, b.key
		b.mu.Unlock()
		if down {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if env.Kind == "msg" {
			answer, _ := json.Marshal(map[string]any{
				"from": req.Bot, "to": []string{env.From},
				"message": map[string]string{"id": "re-" + env.Msg.ID, "text": "echo: " + env.Msg.Text},
			})
			hr, _ := http.NewRequest(http.MethodPost, "http://"+api+"/v1/server/messages", bytes.NewReader(answer))
			hr.Header.Set("Authorization", "Bearer "+key)
			resp, err := http.DefaultClient.Do(hr)
			if err != nil {
				// The server may be restarting.
				t.Logf("answer: %v", err)
				w.WriteHeader(http.StatusBadGateway)
				return
			}
			ans, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Logf("answer refused: %s %s", resp.Status, ans)
				// Not taken: the message comes again.
				w.WriteHeader(http.StatusBadGateway)
				return
			}
		}
		b.mu.Lock()
		b.got, b.nodes = append(b.got, env.Msg.ID), append(b.nodes, req.Node)
		b.mu.Unlock()
	})
	b.URL = srv.URL
	return b
}

// serve points the bot's answers at s.
func (b *echoBot) serve(t *testing.T, s *Server) {
	key := makeKey(t, s, apikeys.ScopeSend)
	b.mu.Lock()
	b.api, b.key = s.HTTPAddr(), key
	b.mu.Unlock()
}

func (b *echoBot) setDown(down bool) {
	b.mu.Lock()
	b.down = down
	b.mu.Unlock()
}

// taken returns the distinct ids taken, in the order first taken, and
// the node that sent the last request.
func (b *echoBot) taken() (ids []string, last string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, id := range b.got {
		if !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	if len(b.nodes) > 0 {
		last = b.nodes[len(b.nodes)-1]
	}
	return ids, last
}

// waitTaken waits until the webhook took the message id: the answer can
// reach a phone before the handler that sent it records the message.
func (b *echoBot) waitTaken(t *testing.T, id string) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() bool {
		ids, _ := b.taken()
		return slices.Contains(ids, id)
	}, "the webhook took %s", id)
}

// configure makes "echo" a bot answered by b.
func (b *echoBot) configure(c *config.Config) {
	c.Bots.Webhooks = "echo=" + b.URL
	c.Events.Secret = eventsSecret
}

// answers returns the texts of the echo bot's answers p got, in order.
func answers(t *testing.T, p *phone) []string {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, e := range p.got {
		if e.Kind != "msg" || e.From != "echo" {
			continue
		}
		if !e.Server {
			t.Errorf("answer %+v: not marked as the server's", e)
		}
		var m struct{ Text string }
		if err := json.Unmarshal(e.Msg, &m); err != nil {
			t.Errorf("answer %s: %v", e.Msg, err)
		}
		out = append(out, m.Text)
	}
	return out
}

// waitAnswers waits until p got the echo bot's answers want, in order.
func waitAnswers(t *testing.T, p *phone, want ...string) {
	t.Helper()
	testutil.Eventually(t, 20*time.Second, func() bool { return len(answers(t, p)) >= len(want) },
		"answers: got %v, want %v", answers(t, p), want)
	if got := answers(t, p); !slices.Equal(got, want) {
		t.Fatalf("answers %v, want %v", got, want)
	}
}

// TestBotAnswers: messages to a bot user go to its webhook, which answers
// through the server API; the sender gets delivered receipts once the
// webhook took each; while the webhook is down its messages wait, across
// a restart, and go once it is back.
func TestBotAnswers(t *testing.T) {
	dir := t.TempDir()
	bot := newEchoBot(t)
	s := startServer(t, dir, bot.configure)
	bot.serve(t, s)
	alice := mustDial(t, s, "alice", phoneOpt{})
	for i := range 3 {
		alice.send("echo", fmt.Sprintf("a%d", i), fmt.Sprintf(`,"text":"hi %d"`, i))
	}
	waitAnswers(t, alice, "echo: hi 0", "echo: hi 1", "echo: hi 2")
	testutil.Eventually(t, 10*time.Second, func() bool { return len(receiptsFor(alice, "delivered")) >= 3 }, "delivered receipts")
	if got := receiptsFor(alice, "delivered"); !slices.Equal(got, []string{"a0", "a1", "a2"}) {
		t.Fatalf("delivered receipts for %v, want a0 a1 a2", got)
	}
	testutil.Eventually(t, 10*time.Second, func() bool {
		d, err := s.queue.Depth("echo")
		return err == nil && d == 0
	}, "the bot's queue empties")

	bot.setDown(true)
	alice.send("echo", "a3", `,"text":"later"`)
	testutil.Eventually(t, 10*time.Second, func() bool { return s.botStats().Retried > 0 }, "the webhook refused")
	alice.client.Disconnect(100)
	stopServer(t, s)

	bot.setDown(false)
	s = startServer(t, dir, bot.configure)
	bot.serve(t, s)
	alice = mustDial(t, s, "alice", phoneOpt{})
	waitAnswers(t, alice, "echo: later")
	bot.waitTaken(t, "a3")
	if ids, _ := bot.taken(); !slices.Equal(ids, []string{"a0", "a1", "a2", "a3"}) {
		t.Fatalf("the webhook took %v", ids)
	}
}

// receiptsFor returns the ids of the receipts of status p got, in order.
func receiptsFor(p *phone, status string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, raw := range p.raw {
		var e struct {
			Kind, Status string
			IDs          []string
		}
		if json.Unmarshal(raw, &e) == nil && e.Kind == "receipt" && e.Status == status {
			out = append(out, e.IDs...)
		}
	}
	return out
}

// TestClusterBot: in a cluster one node at a time feeds a bot's webhook;
// when that node stops, another takes over and nothing is lost.
func TestClusterBot(t *testing.T) {
	bot := newEchoBot(t)
	nodes := startTestClusterWith(t, 3, bot.configure)
	bot.serve(t, nodes[0])
	alice := mustDial(t, nodes[0], "alice", phoneOpt{})
	alice.send("echo", "c0", `,"text":"one"`)
	waitAnswers(t, alice, "echo: one")
	bot.waitTaken(t, "c0")
	_, holder := bot.taken()
	var rest []*Server
	for _, n := range nodes {
		if n.cfg.Cluster.Node == holder {
			alice.client.Disconnect(100)
			stopServer(t, n)
		} else {
			rest = append(rest, n)
		}
	}
	if len(rest) != 2 {
		t.Fatalf("holder %q is none of the nodes", holder)
	}
	bot.serve(t, rest[0])
	alice = mustDial(t, rest[0], "alice", phoneOpt{})
	alice.send("echo", "c1", `,"text":"two"`)
	// A new connection: the first answer was taken by the first.
	waitAnswers(t, alice, "echo: two")
	bot.waitTaken(t, "c1")
	ids, now := bot.taken()
	if !slices.Equal(ids, []string{"c0", "c1"}) || now == holder {
		t.Fatalf("the webhook took %v, last from %s (first holder %s)", ids, now, holder)
	}
}
