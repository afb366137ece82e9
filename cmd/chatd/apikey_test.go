package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/service/apikeys"
)

// TestAPIKey makes, lists and revokes a key with the command while a
// server runs on the same data dir: the server takes the key at once and
// refuses it once revoked.
func TestAPIKey(t *testing.T) {
	isolate(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs, done := serveBackground(ctx)
	_, httpAddr := waitStarted(t, logs, done)

	send := func(key string) int {
		req, err := http.NewRequest(http.MethodPost, "http://"+httpAddr+"/v1/server/messages",
			strings.NewReader(`{"to":["bob"],"message":{"id":"m-1","text":"hi"}}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"apikey", "create", "backend"}, "at least one scope"},
		{[]string{"apikey", "create", "backend", "--scope", "send,root"}, `unknown scope "root"`},
		{[]string{"apikey", "create", "bad name", "--scope", "send"}, "key name"},
		{[]string{"apikey", "revoke", "0123456789abcdef"}, "no API key"},
	} {
		if _, _, err := run(ctx, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want %q", c.args, err, c.want)
		}
	}
	key, stderr, err := run(ctx, "apikey", "create", "backend", "--scope", "send,read")
	key = strings.TrimSpace(key)
	if err != nil || !strings.HasPrefix(key, "chatd_") || !strings.Contains(stderr, "shown only now") {
		t.Fatalf("create: %q %q %v", key, stderr, err)
	}
	if st := send(key); st != http.StatusOK {
		t.Fatalf("send with the new key: %d", st)
	}
	list, _, err := run(ctx, "apikey", "list")
	id := strings.Split(key, "_")[1]
	if err != nil || !strings.Contains(list, id) || !strings.Contains(list, "backend") || !strings.Contains(list, "send,read") || strings.Contains(list, key) {
		t.Fatalf("list: %q %v: want the key's id, name and scopes, not the key", list, err)
	}
	if _, _, err := run(ctx, "apikey", "revoke", id); err != nil {
		t.Fatal(err)
	}
	if st := send(key); st != http.StatusUnauthorized {
		t.Errorf("send with the revoked key: %d, want 401", st)
	}

	cancel()
	waitServeEnd(t, logs, done)
	goleak.VerifyNone(t)
}

// TestAPIKeyCluster makes and revokes a key in a cluster's JetStream
// bucket, reached at cluster.url, as the nodes read it.
func TestAPIKeyCluster(t *testing.T) {
	isolate(t)
	node, err := natsnode.Start(t.Context(), natsnode.Config{Name: "solo", Dir: t.TempDir(), Listen: "127.0.0.1:0",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Shutdown)
	t.Setenv("CHATD_CLUSTER_URL", node.ClientURL())
	t.Setenv("CHATD_CLUSTER_REPLICAS", "1")
	t.Setenv("CHATD_CLUSTER_NODE", "n1") // the node's own settings, as on a node
	key, _, err := run(t.Context(), "apikey", "create", "backend", "--scope", "send", "--cluster")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	keys, err := apikeys.NewKV(ctx, node.JetStream(), broker.APIKeysBucket, 1)
	if err != nil {
		t.Fatal(err)
	}
	k, err := apikeys.Check(keys, strings.TrimSpace(key))
	if err != nil || k.Name != "backend" {
		t.Fatalf("key in the bucket: %+v, %v", k, err)
	}
	if _, _, err := run(t.Context(), "apikey", "revoke", k.ID, "--cluster"); err != nil {
		t.Fatal(err)
	}
	if _, err := apikeys.Check(keys, strings.TrimSpace(key)); err == nil {
		t.Error("revoked key still in the bucket")
	}
}
