package broker

import (
	"encoding/json"
	"fmt"
	"testing"
)

func TestDirectMessage(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	alice := mustDial(t, s, "alice", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})

	payload := `{"id":"m-1","text":"hi",  "n":[1,2,{"x":"}"}]}`
	alice.publish("inbox/bob", []byte(payload))
	got := bob.waitFor(1)[0]
	if got.Kind != "msg" || got.From != "alice" || got.To != "bob" || got.TS == 0 {
		t.Fatalf("envelope = %+v", got)
	}
	if string(got.Msg) != payload {
		t.Fatalf("msg = %s, want the sender's object byte for byte: %s", got.Msg, payload)
	}
}

func TestSenderCannotSpoofFrom(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	mallory := mustDial(t, s, "mallory", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})
	mallory.publish("inbox/bob", []byte(`{"id":"x","from":"alice","kind":"receipt"}`))
	got := bob.waitFor(1)[0]
	if got.From != "mallory" || got.Kind != "msg" {
		t.Fatalf("envelope from=%q kind=%q, want mallory/msg", got.From, got.Kind)
	}
	var inner map[string]string
	if err := json.Unmarshal(got.Msg, &inner); err != nil || inner["from"] != "alice" {
		t.Fatalf("inner object changed: %s", got.Msg)
	}
}

func TestOfflineQueueDeliveredInOrder(t *testing.T) {
	const n = 10000
	s := startServer(t, t.TempDir(), nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	bob.client.Disconnect(100)

	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	toks := make(chan error, n)
	for i := range n {
		tk := alice.client.Publish("inbox/bob", 1, false, fmt.Sprintf(`{"id":"m-%d"}`, i))
		go func() { tk.Wait(); toks <- tk.Error() }()
	}
	for range n {
		if err := <-toks; err != nil {
			t.Fatal(err)
		}
	}
	bob = mustDial(t, s, "bob", phoneOpt{})
	bob.waitFor(n)
	ids := bob.ids()
	for i := range n {
		if ids[i] != fmt.Sprintf("m-%d", i) {
			t.Fatalf("message %d is %q, want m-%d", i, ids[i], i)
		}
	}
}
