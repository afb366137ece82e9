// The race detector is off for this file: paho.mqtt.golang v1.5.1 races
// with itself when it resumes stored publishes after a reconnect
// (client.resume against startOutgoingComms), which this test does on
// purpose. The server under test is a separate process either way.
// `make test` runs it in a second pass without -race.

//go:build !race

package broker

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/internal/testutil"
)

var (
	chatdOnce sync.Once
	chatdPath string
	chatdErr  error
)

// chatdBinary builds cmd/chatd once per test run.
func chatdBinary(t *testing.T) string {
	t.Helper()
	chatdOnce.Do(func() {
		dir, err := os.MkdirTemp("", "chatd-bin")
		if err != nil {
			chatdErr = err
			return
		}
		chatdPath = filepath.Join(dir, "chatd")
		out, err := exec.Command("go", "build", "-o", chatdPath, "github.com/chatd/chatd/cmd/chatd").CombinedOutput()
		if err != nil {
			chatdErr = fmt.Errorf("build chatd: %v\n%s", err, out)
		}
	})
	if chatdErr != nil {
		t.Fatal(chatdErr)
	}
	return chatdPath
}

// serverProcess is chatd running as a child process, to be killed for real.
type serverProcess struct {
	t       *testing.T
	bin     string
	dataDir string
	addr    string
	http    string
	log     *os.File
	cmd     *exec.Cmd
	// env is the extra environment a cluster node restarts with.
	env []string
}

func newServerProcess(t *testing.T, extraEnv ...string) *serverProcess {
	p := newStoppedProcess(t)
	p.start(extraEnv...)
	return p
}

// newStoppedProcess prepares a server process and its log without starting it.
func newStoppedProcess(t *testing.T) *serverProcess {
	p := &serverProcess{t: t, bin: chatdBinary(t), dataDir: t.TempDir(), addr: freeAddr(t), http: freeAddr(t)}
	f, err := os.Create(filepath.Join(t.TempDir(), "chatd.log"))
	if err != nil {
		t.Fatal(err)
	}
	p.log = f
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			if b, err := os.ReadFile(f.Name()); err == nil {
				t.Logf("server log:\n%s", b)
			}
		}
		f.Close()
	})
	return p
}

func (p *serverProcess) start(extraEnv ...string) {
	p.t.Helper()
	p.launch(extraEnv...)
	if err := p.waitListening(); err != nil {
		p.t.Fatal(err)
	}
}

// launch starts the process without waiting for it to listen.
func (p *serverProcess) launch(extraEnv ...string) {
	p.t.Helper()
	cmd := exec.Command(p.bin, "serve", "--data-dir", p.dataDir, "--listen", p.addr, "--http", p.http)
	cmd.Env = append(os.Environ(), "CHATD_AUTH_SECRET="+string(testSecret),
		// One sender publishes as fast as it can: lift the per-user limit.
		"CHATD_LIMITS_PUBLISH_RATE=1000000", "CHATD_LIMITS_PUBLISH_BYTES_RATE=1073741824",
		"CHATD_QUEUE_MIN_FREE_BYTES=1048576")
	cmd.Env = append(cmd.Env, extraEnv...)
	cmd.Stdout, cmd.Stderr = p.log, p.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start chatd: %v", err)
	}
	p.cmd = cmd
}

// waitListening waits until the process accepts MQTT connections.
func (p *serverProcess) waitListening() error {
	err := testutil.Poll(60*time.Second, func() error {
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		return fmt.Errorf("chatd did not listen on %s: %w", p.addr, err)
	}
	return nil
}

// kill sends SIGKILL: no shutdown code runs.
func (p *serverProcess) kill() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	_ = p.cmd.Wait()
	p.cmd = nil
}

// receiver counts deliveries per id and per connection.
type receiver struct {
	mu    sync.Mutex
	conn  int
	first map[string]int // id -> connection number of its first delivery
	dups  map[string]int // id -> connection number of a later delivery
	n     int
}

func TestNoAckedMessageLostAcrossSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills a server process")
	}
	cases := []struct {
		name   string
		total  int
		kills  int
		random bool
	}{
		{"3 kills between publishes", 6000, 3, false},
		// Kills land anywhere: mid-commit, mid-delivery, mid-ack-flush.
		{"20 kills at random times", 20000, 20, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { sigkillRun(t, c.total, c.kills, c.random) })
	}
}

// sigkillRun publishes total messages while the server is killed kills
// times, at evenly spread publishes or at random moments, and checks that
// every PUBACKed message is delivered.
func sigkillRun(t *testing.T, total, kills int, random bool) {
	srv := newServerProcess(t)
	rcv := &receiver{conn: 1, first: map[string]int{}, dups: map[string]int{}}
	onMsg := func(_ paho.Client, m paho.Message) {
		id := innerID(t, decodeEnvelope(t, m.Payload()))
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		if _, seen := rcv.first[id]; seen {
			rcv.dups[id] = rcv.conn
			return
		}
		rcv.first[id] = rcv.conn
		rcv.n++
	}
	bobOpts := paho.NewClientOptions().AddBroker("tcp://" + srv.addr).
		SetClientID("bob").SetUsername("bob").SetPassword(mint(t, "bob")).
		SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(100 * time.Millisecond).
		SetConnectRetry(true).SetConnectRetryInterval(100 * time.Millisecond).SetOrderMatters(true).
		SetDefaultPublishHandler(onMsg)
	// Counted when the connection is lost, so a message redelivered on the
	// next connection, even before its OnConnect, is seen as such.
	bobOpts.SetConnectionLostHandler(func(paho.Client, error) {
		rcv.mu.Lock()
		rcv.conn++
		rcv.mu.Unlock()
	})
	bobOpts.SetOnConnectHandler(func(c paho.Client) { c.Subscribe("inbox/bob", 1, onMsg) })
	bob := paho.NewClient(bobOpts)
	bob.Connect().Wait()
	defer bob.Disconnect(100)

	aliceOpts := paho.NewClientOptions().AddBroker("tcp://" + srv.addr).
		SetClientID("alice").SetUsername("alice").SetPassword(mint(t, "alice")).
		SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(100 * time.Millisecond).
		SetConnectRetry(true).SetConnectRetryInterval(100 * time.Millisecond).
		SetWriteTimeout(5 * time.Second)
	alice := paho.NewClient(aliceOpts)
	alice.Connect().Wait()
	defer alice.Disconnect(100)

	killAt := map[int]bool{}
	if random {
		// Kill at random publishes, each followed by a random pause so that
		// the kill lands at any point of the server's work.
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
		for len(killAt) < kills {
			killAt[1+rng.IntN(total-1)] = true
		}
	} else {
		for k := 1; k <= kills; k++ {
			killAt[k*total/(kills+1)] = true
		}
	}
	pause := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 2))
	acked := publishToBob(alice, total, func(i int) {
		if killAt[i] {
			if random {
				time.Sleep(time.Duration(pause.IntN(20)) * time.Millisecond)
			}
			srv.kill()
			srv.start()
		}
	})

	err := testutil.Poll(60*time.Second, func() error {
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		if rcv.n < total {
			return fmt.Errorf("%d of %d messages received", rcv.n, total)
		}
		return nil
	})
	if err != nil {
		// Only what was PUBACKed must arrive: checked below.
		t.Logf("waiting for every message: %v", err)
	}
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	lost := 0
	acked.Range(func(k, _ any) bool {
		if _, ok := rcv.first[k.(string)]; !ok {
			lost++
			if lost <= 10 {
				t.Errorf("PUBACKed message %s never delivered", k)
			}
		}
		return true
	})
	if lost > 0 {
		t.Fatalf("%d PUBACKed messages lost across %d SIGKILLs", lost, kills)
	}
	for id, conn := range rcv.dups {
		if rcv.first[id] == conn {
			t.Errorf("%s delivered twice on one connection: duplicates may only come from redelivery after a reconnect", id)
		}
	}
	t.Logf("%d messages, %d kills, %d connections of the receiver, %d duplicates, 0 lost", total, kills, rcv.conn, len(rcv.dups))
}

// publishToBob publishes messages m-0 to m-(total-1) from c to bob's inbox
// with up to 64 in flight, calling before(i) ahead of message i, and
// returns the ids that were PUBACKed. paho resends unacknowledged
// publishes after each reconnect, and the server's dedup absorbs resends
// of what it had stored.
func publishToBob(c paho.Client, total int, before func(i int)) *sync.Map {
	var acked sync.Map
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range total {
		before(i)
		sem <- struct{}{}
		id := fmt.Sprintf("m-%d", i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			for {
				tk := c.Publish("inbox/bob", 1, false, fmt.Sprintf(`{"id":%q}`, id))
				if tk.WaitTimeout(60*time.Second) && tk.Error() == nil {
					acked.Store(id, true)
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	return &acked
}
