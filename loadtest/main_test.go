package loadtest

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/config"
)

// serveEnv, when set to "DATADIR ADDR", turns the test binary into a chatd
// server: the crash scenario's test starts, kills and restarts it.
const serveEnv = "LOADTEST_TEST_SERVE"

var testSecret = []byte("loadtest-secret-0123456789-0123456789")

// relayFlag, followed by "LISTEN,TARGET,DELAY", turns the test binary
// into a TCP relay from LISTEN to TARGET that starts listening after DELAY:
// a second node for the crash scenario, serving the same queues as the
// first without a cluster, and slow enough to restart that its clients
// move to the other node meanwhile.
const relayFlag = "-loadtest.relay="

// TestMain checks that runs leave no goroutine behind, or serves chatd
// or a relay when the crash tests run this binary as their servers.
func TestMain(m *testing.M) {
	for _, a := range os.Args[1:] {
		if spec, ok := strings.CutPrefix(a, relayFlag); ok {
			os.Exit(relayForCrashTest(spec))
		}
	}
	if spec := os.Getenv(serveEnv); spec != "" {
		os.Exit(serveForCrashTest(spec))
	}
	// As in cmd/loadtest: toxiproxy's bandwidth toxic logs at trace level
	// through zerolog's global logger.
	zerolog.SetGlobalLevel(zerolog.InfoLevel)
	goleak.VerifyTestMain(m,
		// toxiproxy v2.5.0: when a cut ends a connection while its first
		// stub holds a chunk, that stub blocks forever on a channel nobody
		// reads. FaultProxy lifts its shaping toxics during cuts so that only
		// this rare one remains.
		goleak.IgnoreTopFunction("github.com/Shopify/toxiproxy/v2/toxics.(*NoopToxic).Pipe"))
}

func serveForCrashTest(spec string) int {
	var dir, addr string
	if _, err := fmt.Sscan(spec, &dir, &addr); err != nil {
		fmt.Fprintln(os.Stderr, "bad", serveEnv, err)
		return 2
	}
	s, err := newChatd(dir, addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	<-ctx.Done()
	cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Close(cctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// relayForCrashTest copies bytes between each connection to LISTEN and a
// new connection to TARGET until either side closes, and until SIGTERM.
func relayForCrashTest(spec string) int {
	parts := strings.Split(spec, ",")
	if len(parts) != 3 {
		fmt.Fprintln(os.Stderr, "bad", relayFlag, spec)
		return 2
	}
	listen, target := parts[0], parts[1]
	delay, err := time.ParseDuration(parts[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad", relayFlag, err)
		return 2
	}
	time.Sleep(delay)
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	go func() {
		for {
			down, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer down.Close()
				// While the target is down, the client sees its connection
				// close and moves on, as from a node that cannot serve.
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{}, 2)
				go func() { _, _ = io.Copy(up, down); done <- struct{}{} }()
				go func() { _, _ = io.Copy(down, up); done <- struct{}{} }()
				<-done
			}()
		}
	}()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	<-ctx.Done()
	if err := ln.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// newChatd starts chatd on listen with its data in dir, its default
// configuration changed by tune, if any.
func newChatd(dir, listen string, tune ...func(*config.Config)) (*broker.Server, error) {
	cfg := config.Default()
	cfg.DataDir = dir
	cfg.Listen = listen
	cfg.HTTP = ""
	// Runs must not depend on how full the machine's disk is.
	cfg.Queue.MinFreeBytes = 1 << 20
	for _, f := range tune {
		f(&cfg)
	}
	s, err := broker.New(broker.Options{Config: cfg, Secret: testSecret, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return nil, fmt.Errorf("new chatd: %w", err)
	}
	if err := s.Start(); err != nil {
		return nil, fmt.Errorf("start chatd: %w", err)
	}
	return s, nil
}

// startChatd runs our server in-process on a free loopback port, its
// configuration changed by tune, and returns its broker URL.
func startChatd(t *testing.T, tune ...func(*config.Config)) string {
	t.Helper()
	return "tcp://" + startChatdServer(t, tune...).MQTTAddr()
}

// startChatdServer runs our server in-process on a free loopback port, its
// configuration changed by tune, until the test ends.
func startChatdServer(t *testing.T, tune ...func(*config.Config)) *broker.Server {
	t.Helper()
	s, err := newChatd(t.TempDir(), "127.0.0.1:0", tune...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("close chatd: %v", err)
		}
	})
	return s
}

// startMochi runs a plain MQTT broker that lets everyone in and returns
// its host:port.
func startMochi(t *testing.T) string {
	t.Helper()
	return startMochiWith(t, new(allowAll))
}

// startMochiWith runs a plain MQTT broker with hook deciding who may
// connect and returns its host:port.
func startMochiWith(t *testing.T, hook mochi.Hook) string {
	t.Helper()
	srv := mochi.New(&mochi.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := srv.AddHook(hook, nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("t", ln)); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("close mochi: %v", err)
		}
	})
	return ln.Addr().String()
}

// allowAll lets every client connect and use every topic. It stands in for
// mochi's auth.AllowHook, whose package pulls in a YAML module this module
// does not require.
type allowAll struct{ mochi.HookBase }

func (h *allowAll) ID() string { return "allow-all" }

func (h *allowAll) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}

func (h *allowAll) OnConnectAuthenticate(*mochi.Client, packets.Packet) bool { return true }

func (h *allowAll) OnACLCheck(*mochi.Client, string, bool) bool { return true }

// passwordAuth lets in clients whose username is "acct-" and their client
// ID, with password, as a broker with one account per user (EMQX's
// built-in database, HiveMQ's file realm) would.
type passwordAuth struct {
	allowAll
	password string
}

func (h *passwordAuth) ID() string { return "password" }

func (h *passwordAuth) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	return string(pk.Connect.Username) == "acct-"+cl.ID && string(pk.Connect.Password) == h.password
}
