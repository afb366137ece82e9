package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/chatdtest"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// devices lists the client IDs of the devices of the token's user.
func devices(t *testing.T, s *broker.Server, tok string) []string {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+s.HTTPAddr()+"/v1/devices", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Devices []struct {
			ClientID string `json:"client_id"`
		} `json:"devices"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range body.Devices {
		out = append(out, d.ClientID)
	}
	return out
}

// TestSendListen runs the program against a real chatd: alice sends
// while bob listens and marks it read; the usage errors exit 2.
func TestSendListen(t *testing.T) {
	secret := []byte(strings.Repeat("c", 32))
	s := chatdtest.Start(t, secret, nil)
	mint := func(user string) string {
		tok, err := token.Mint(secret, user, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	server := "mqtt://" + s.MQTTAddr()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// bob's listener is a device of his: register it, then leave.
	var out, errs bytes.Buffer
	listening, stop := context.WithCancel(ctx)
	listened := make(chan int, 1)
	go func() {
		listened <- run(listening, []string{"--server", server, "--user", "bob", "--token", mint("bob"), "listen"}, io.Discard, io.Discard)
	}()
	testutil.Eventually(t, 10*time.Second, func() bool { return len(devices(t, s, mint("bob"))) == 1 }, "bob's listener never registered")
	stop()
	if code := <-listened; code != 0 {
		t.Fatalf("listen: exit %d", code)
	}

	const n = 5
	for i := range n {
		out.Reset()
		if code := run(ctx, []string{"--server", server, "--user", "alice", "--token", mint("alice"), "send", "bob", fmt.Sprintf("hello %d", i)}, &out, &errs); code != 0 {
			t.Fatalf("send: exit %d, %s", code, errs.String())
		}
		if !strings.HasPrefix(out.String(), "stored ") {
			t.Errorf("send printed %q, want stored ID", out.String())
		}
	}
	// send used a transient device: alice has none once it is gone.
	testutil.Eventually(t, 10*time.Second, func() bool { return len(devices(t, s, mint("alice"))) == 0 },
		"alice still has a device after sending: %v", devices(t, s, mint("alice")))

	// bob reads one message and stops; the four he did not print come to
	// his next run, none lost.
	texts := func(b []byte) []string {
		var got []string
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			var line struct {
				Event string
				Data  struct {
					From string
					Msg  struct{ Text string }
				}
			}
			if err := json.Unmarshal([]byte(l), &line); err != nil {
				t.Fatalf("listen printed %q: %v", l, err)
			}
			if line.Event == "Message" {
				got = append(got, line.Data.Msg.Text)
			}
		}
		return got
	}
	out.Reset()
	if code := run(ctx, []string{"--server", server, "--user", "bob", "--token", mint("bob"), "listen", "--read", "--count", "1"}, &out, &errs); code != 0 {
		t.Fatalf("listen: exit %d, %s", code, errs.String())
	}
	if got := texts(out.Bytes()); len(got) != 1 || got[0] != "hello 0" {
		t.Fatalf("first listen printed %v, want hello 0", got)
	}
	out.Reset()
	if code := run(ctx, []string{"--server", server, "--user", "bob", "--token", mint("bob"), "listen", "--count", "4"}, &out, &errs); code != 0 {
		t.Fatalf("listen: exit %d, %s", code, errs.String())
	}
	got := texts(out.Bytes())
	want := []string{"hello 1", "hello 2", "hello 3", "hello 4"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("second listen printed %v, want %v", got, want)
	}

	for _, args := range [][]string{
		{"send", "bob", "no user"},
		{"--user", "alice", "--token", "t", "send", "bob"},
		{"--user", "alice", "--token", "t", "shout"},
		{"--no-such-flag"},
	} {
		if code := run(ctx, args, io.Discard, io.Discard); code != 2 {
			t.Errorf("chatcli %v: exit %d, want 2", args, code)
		}
	}
}
