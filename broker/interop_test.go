package broker

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"
)

// TestStockMosquittoClients drives the server with Debian's mosquitto_pub
// and mosquitto_sub, as the README quickstart does.
func TestStockMosquittoClients(t *testing.T) {
	sub, err := exec.LookPath("mosquitto_sub")
	if err != nil {
		t.Skip("mosquitto_sub not found: install it with `apt-get install mosquitto-clients` (.ci/run does)")
	}
	pub, err := exec.LookPath("mosquitto_pub")
	if err != nil {
		t.Skip("mosquitto_pub not found: install it with `apt-get install mosquitto-clients` (.ci/run does)")
	}
	s := startServer(t, t.TempDir(), nil)
	host, port, err := net.SplitHostPort(s.MQTTAddr())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	const n = 3
	subCmd := exec.CommandContext(ctx, sub, "-h", host, "-p", port, "-q", "1", "-c", "-i", "bob/cli",
		"-u", "bob", "-P", mint(t, "bob"), "-t", "inbox/bob", "-C", fmt.Sprint(n))
	out, err := subCmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := subCmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer subCmd.Wait()
	// mosquitto_sub prints nothing until messages arrive: wait until its
	// device is fed so the publishes below go to a subscribed inbox.
	deadline, _ := ctx.Deadline()
	testutil.Eventually(t, time.Until(deadline), func() bool {
		_, _, ok := s.path.Window("bob", "cli")
		return ok
	}, "mosquitto_sub never subscribed")

	for i := range n {
		msg := fmt.Sprintf(`{"id":"cli-%d","text":"hello %d"}`, i, i)
		cmd := exec.CommandContext(ctx, pub, "-h", host, "-p", port, "-q", "1",
			"-u", "alice", "-P", mint(t, "alice"), "-t", "inbox/bob", "-m", msg)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_pub: %v: %s", err, b)
		}
	}
	sc := bufio.NewScanner(out)
	for i := range n {
		if !sc.Scan() {
			t.Fatalf("mosquitto_sub ended after %d messages: %v", i, sc.Err())
		}
		var e envelopeMsg
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		want := fmt.Sprintf(`{"id":"cli-%d","text":"hello %d"}`, i, i)
		if e.From != "alice" || string(e.Msg) != want {
			t.Fatalf("message %d = %s", i, sc.Text())
		}
	}

	// A bad token is refused.
	cmd := exec.CommandContext(ctx, pub, "-h", host, "-p", port, "-q", "1",
		"-u", "alice", "-P", "not-a-token", "-t", "inbox/bob", "-m", `{"id":"x"}`)
	b, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(strings.ToLower(string(b)), "not authori") {
		t.Fatalf("mosquitto_pub with a bad token: err %v, output %q", err, b)
	}
}
