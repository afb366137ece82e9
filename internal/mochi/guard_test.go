package mochi

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/internal/testutil"
)

// served is a Guard serving on a loopback TCP listener of mochi's, with
// an establish function of the test's.
type served struct {
	guard Guard
	log   *testutil.SyncBuffer
	// dialed and ended count the connections made and those the Guard is
	// done with, OnEnd and OnPanic included: mochi's TCP listener serves
	// each on a goroutine it does not wait for.
	dialed, ended int
	ends          chan struct{}
	done          chan struct{}
}

// countingListener reports on ends each connection its Guard is done with.
type countingListener struct {
	listeners.Listener
	ends chan<- struct{}
}

// Serve serves through l.Listener, reporting each end of establish.
func (l countingListener) Serve(establish listeners.EstablishFn) {
	l.Listener.Serve(func(id string, c net.Conn) error {
		defer func() { l.ends <- struct{}{} }()
		return establish(id, c)
	})
}

// serve starts g, with its Listener set to a new loopback TCP listener,
// calling establish for each connection; the listener is closed and every
// connection waited for when the test ends.
func serve(t *testing.T, g Guard, establish listeners.EstablishFn) *served {
	t.Helper()
	tcp := listeners.NewTCP(listeners.Config{ID: "t1", Address: "127.0.0.1:0"})
	s := &served{log: &testutil.SyncBuffer{}, ends: make(chan struct{}, 64), done: make(chan struct{})}
	if err := tcp.Init(slog.New(slog.NewTextHandler(s.log, nil))); err != nil {
		t.Fatalf("listen: %v", err)
	}
	g.Listener = countingListener{Listener: tcp, ends: s.ends}
	s.guard = g
	go func() {
		defer close(s.done)
		g.Serve(establish)
	}()
	t.Cleanup(func() {
		s.stop(t)
	})
	return s
}

// stop closes the listener and waits until Serve has returned and every
// connection dialed has ended.
func (s *served) stop(t *testing.T) {
	t.Helper()
	s.guard.Close(func(string) {})
	<-s.done
	s.waitEnded(t, s.dialed)
}

// waitEnded waits until the Guard is done with n connections in all.
func (s *served) waitEnded(t *testing.T, n int) {
	t.Helper()
	for s.ended < n {
		select {
		case <-s.ends:
			s.ended++
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d connections ended", s.ended, n)
		}
	}
}

// dial opens a bare TCP connection to s, closed when the test ends.
func (s *served) dial(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.guard.Address(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	s.dialed++
	t.Cleanup(func() { c.Close() })
	return c
}

// waitClosed fails the test unless the server closes c within d. What c
// reads meanwhile is discarded.
func waitClosed(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(d)); err != nil {
		t.Fatal(err)
	}
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection still open after %v", d)
	}
	// nil is EOF; a reset is a close too.
}

// TestGuardConnectDeadline: a connection's first read fails once Timeout
// has passed without a byte, and not before; bytes sent in time are read.
func TestGuardConnectDeadline(t *testing.T) {
	const timeout = 150 * time.Millisecond
	tests := []struct {
		name     string
		send     []byte
		wantRead string
		wantErr  error
	}{
		{"silent", nil, "", os.ErrDeadlineExceeded},
		{"sends in time", []byte("CONNECT"), "CONNECT", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			type result struct {
				read string
				err  error
				at   time.Time
			}
			results := make(chan result, 1)
			s := serve(t, Guard{Timeout: timeout}, func(_ string, c net.Conn) error {
				defer c.Close()
				b := make([]byte, 7)
				n, err := io.ReadFull(c, b)
				results <- result{string(b[:n]), err, time.Now()}
				return err
			})
			// Before the dial, so before the deadline was set.
			start := time.Now()
			c := s.dial(t)
			if tt.send != nil {
				if _, err := c.Write(tt.send); err != nil {
					t.Fatal(err)
				}
			}
			var r result
			select {
			case r = <-results:
			case <-time.After(10 * time.Second):
				t.Fatal("establish never returned")
			}
			if !errors.Is(r.err, tt.wantErr) || r.read != tt.wantRead {
				t.Fatalf("read %q, %v; want %q, %v", r.read, r.err, tt.wantRead, tt.wantErr)
			}
			if took := r.at.Sub(start); tt.wantErr != nil && took < timeout {
				t.Errorf("the deadline struck after %v, before the timeout %v", took, timeout)
			}
			waitClosed(t, c, 10*time.Second)
		})
	}
}

// allowAll lets every client connect.
type allowAll struct{ mqtt.HookBase }

func (h *allowAll) ID() string { return "allow-all" }

func (h *allowAll) Provides(b byte) bool { return b == mqtt.OnConnectAuthenticate }

func (h *allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

// rawConnect is an MQTT 3.1.1 CONNECT of client "c1", clean session,
// keepalive 60 s.
var rawConnect = []byte{
	0x10, 14, // CONNECT, remaining length
	0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, // protocol, level 4, clean session, keepalive
	0, 2, 'c', '1', // client identifier
}

// TestGuardOnMochi puts a Guard in front of a real mochi server: a peer
// that sends no CONNECT, or only part of one, is dropped after Timeout;
// one that connects keeps its connection past Timeout, mochi's keepalive
// having replaced the deadline.
func TestGuardOnMochi(t *testing.T) {
	const timeout = 150 * time.Millisecond
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := mqtt.New(&mqtt.Options{Logger: log})
	if err := srv.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "t1", Address: "127.0.0.1:0"})
	// CloseClients as the server sets it: mochi's own deadlocks when a
	// client leaves as Close walks the clients (ran into 1 time in 10).
	if err := srv.AddListener(Guard{Listener: tcp, Timeout: timeout, CloseClients: DisconnectOnShutdown(srv)}); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Error(err)
		}
	})
	dial := func(t *testing.T) net.Conn {
		c, err := net.DialTimeout("tcp", tcp.Address(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}

	for _, tt := range []struct {
		name string
		send []byte
	}{
		{"silent", nil},
		{"part of a CONNECT", rawConnect[:5]},
	} {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now() // before the deadline was set
			c := dial(t)
			if _, err := c.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			waitClosed(t, c, 10*time.Second)
			if took := time.Since(start); took < timeout {
				t.Errorf("dropped after %v, before the timeout %v", took, timeout)
			}
		})
	}

	t.Run("connects in time", func(t *testing.T) {
		c := dial(t)
		if _, err := c.Write(rawConnect); err != nil {
			t.Fatal(err)
		}
		if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		r := bufio.NewReader(c)
		ack := make([]byte, 4)
		if _, err := io.ReadFull(r, ack); err != nil || !bytes.Equal(ack, []byte{0x20, 2, 0, 0}) {
			t.Fatalf("CONNACK %x, %v", ack, err)
		}
		// Past the CONNECT deadline: only a connection that kept it
		// still answers. Waiting is the point of this check.
		time.Sleep(3 * timeout)
		if _, err := c.Write([]byte{0xC0, 0}); err != nil { // PINGREQ
			t.Fatal(err)
		}
		resp := make([]byte, 2)
		if _, err := io.ReadFull(r, resp); err != nil || !bytes.Equal(resp, []byte{0xD0, 0}) {
			t.Fatalf("PINGRESP %x, %v: the connection did not outlive the CONNECT deadline", resp, err)
		}
	})
}

// TestGuardRecoversPanic: a panic while serving one connection closes
// that connection, is passed to OnPanic after OnEnd ran, is logged by the
// listener as an error, and leaves the listener serving others.
func TestGuardRecoversPanic(t *testing.T) {
	for _, withOnPanic := range []bool{true, false} {
		t.Run(fmt.Sprintf("OnPanic set %v", withOnPanic), func(t *testing.T) {
			var mu sync.Mutex
			var events []string
			record := func(e string) {
				mu.Lock()
				defer mu.Unlock()
				events = append(events, e)
			}
			g := Guard{Timeout: 10 * time.Second, OnEnd: func(c net.Conn) { record("end " + c.RemoteAddr().String()) }}
			if withOnPanic {
				g.OnPanic = func(c net.Conn, p any) { record(fmt.Sprintf("panic %s %v", c.RemoteAddr(), p)) }
			}
			s := serve(t, g, func(_ string, c net.Conn) error {
				b := make([]byte, 1)
				if _, err := io.ReadFull(c, b); err != nil {
					c.Close()
					return err
				}
				if b[0] == 'P' {
					panic("boom")
				}
				// Echo, so that the client sees it was served.
				_, err := c.Write(b)
				c.Close()
				return err
			})

			bad := s.dial(t)
			if _, err := bad.Write([]byte("P")); err != nil {
				t.Fatal(err)
			}
			waitClosed(t, bad, 10*time.Second)
			s.waitEnded(t, 1) // OnPanic has run

			good := s.dial(t)
			if _, err := good.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			if err := good.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
				t.Fatal(err)
			}
			if b, err := io.ReadAll(good); err != nil || string(b) != "x" {
				t.Fatalf("a connection after the panic read %q, %v; want the echo", b, err)
			}

			s.stop(t)
			want := []string{"end " + bad.LocalAddr().String()}
			if withOnPanic {
				want = append(want, "panic "+bad.LocalAddr().String()+" boom")
			}
			want = append(want, "end "+good.LocalAddr().String())
			mu.Lock()
			got := slices.Clone(events)
			mu.Unlock()
			if !slices.Equal(got, want) {
				t.Errorf("events %q, want %q", got, want)
			}
			// mochi's listener logs the error after establish returned,
			// so after the end counted above.
			testutil.Eventually(t, 10*time.Second, func() bool {
				return strings.Contains(s.log.String(), "closed after a panic: boom")
			}, "the panic is reported to the listener's log")
		})
	}
}

// TestGuardEndsOrdersClose: with Ended set, a connection's Close waits
// while the server holds Ends, and goes through once it lets go.
func TestGuardEndsOrdersClose(t *testing.T) {
	ends := &Ends{}
	closing, closed := make(chan struct{}), make(chan struct{})
	s := serve(t, Guard{Timeout: 10 * time.Second, Ended: ends}, func(_ string, c net.Conn) error {
		close(closing)
		err := c.Close()
		close(closed)
		return err
	})
	ends.mu.Lock()
	s.dial(t)
	<-closing
	// Only a Close that wrongly went through could be seen here: a wait
	// that is too short lets a bug pass, never fails a good Close.
	select {
	case <-closed:
		ends.mu.Unlock()
		t.Fatal("the connection closed while the server held Ends")
	case <-time.After(50 * time.Millisecond):
	}
	ends.mu.Unlock()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection never closed after Ends was let go")
	}
	ends.Pass() // nothing holds it: returns at once
}

// TestGuardClose: closing the Guard disconnects the listener's clients
// through CloseClients when set, through mochi's function otherwise, and
// stops the listener.
func TestGuardClose(t *testing.T) {
	for _, withCloseClients := range []bool{true, false} {
		t.Run(fmt.Sprintf("CloseClients set %v", withCloseClients), func(t *testing.T) {
			var got []string
			g := Guard{Timeout: 10 * time.Second}
			if withCloseClients {
				g.CloseClients = func(id string) { got = append(got, "CloseClients "+id) }
			}
			s := serve(t, g, func(_ string, c net.Conn) error { return c.Close() })
			addr := s.guard.Address()
			s.guard.Close(func(id string) { got = append(got, "mochi "+id) })
			want := []string{"mochi t1"}
			if withCloseClients {
				want = []string{"CloseClients t1"}
			}
			if !slices.Equal(got, want) {
				t.Errorf("closed clients with %q, want %q", got, want)
			}
			select {
			case <-s.done:
			case <-time.After(10 * time.Second):
				t.Fatal("Serve still running after Close")
			}
			if c, err := net.DialTimeout("tcp", addr, 5*time.Second); err == nil {
				c.Close()
				t.Error("the listener still accepts after Close")
			}
		})
	}
}

// TestQuietPackets: the attributes holding a packet are dropped from
// every record, through loggers derived by With and WithGroup too; the
// rest of the record is kept.
func TestQuietPackets(t *testing.T) {
	const secret = "s3cret-password"
	type packet struct{ Password string }
	pk := packet{Password: secret}
	tests := []struct {
		name string
		log  func(l *slog.Logger)
		want map[string]any // top-level keys and values wanted, besides time
	}{
		{"pk", func(l *slog.Logger) {
			l.Warn("error processing packet", "error", "bad", "client", "c1", "pk", pk)
		}, map[string]any{"level": "WARN", "msg": "error processing packet", "error": "bad", "client": "c1"}},
		{"packet", func(l *slog.Logger) {
			l.Debug("failed publishing packet", "packet", pk, "client", "c1")
		}, map[string]any{"level": "DEBUG", "msg": "failed publishing packet", "client": "c1"}},
		{"with attrs", func(l *slog.Logger) {
			l.With("listener", "t1").Info("m", "pk", pk)
		}, map[string]any{"level": "INFO", "msg": "m", "listener": "t1"}},
		{"with group", func(l *slog.Logger) {
			l.WithGroup("hook").Info("packet rejected", "packet", pk, "id", "auth")
		}, map[string]any{"level": "INFO", "msg": "packet rejected", "hook": map[string]any{"id": "auth"}}},
		{"nothing to drop", func(l *slog.Logger) {
			l.Info("m", "a", 1)
		}, map[string]any{"level": "INFO", "msg": "m", "a": float64(1)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			inner := slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})
			tt.log(slog.New(QuietPackets{Handler: inner}))
			if strings.Contains(buf.String(), secret) {
				t.Fatalf("the packet reached the log: %s", buf.String())
			}
			var got map[string]any
			if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
				t.Fatalf("one JSON record wanted: %q: %v", buf.String(), err)
			}
			if _, ok := got["time"]; !ok {
				t.Error("the record lost its time")
			}
			delete(got, "time")
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("logged %v, want %v", got, tt.want)
			}
		})
	}
}

// TestGuardAdmitsBeforeShut: a connection is counted in Clients before
// its establish runs, and uncounted when it returns; once Ends is shut a
// new connection is closed at once, never reaching establish, so that a
// wait on Clients after Shut never races with an Add at zero.
func TestGuardAdmitsBeforeShut(t *testing.T) {
	ends := &Ends{}
	var clients sync.WaitGroup
	inside := make(chan struct{})
	release := make(chan struct{})
	var established atomic.Int32
	s := serve(t, Guard{Timeout: 10 * time.Second, Ended: ends, Clients: &clients}, func(_ string, c net.Conn) error {
		established.Add(1)
		inside <- struct{}{}
		<-release
		return c.Close()
	})
	s.dial(t)
	<-inside
	ends.Shut()
	waited := make(chan struct{})
	go func() {
		clients.Wait()
		close(waited)
	}()
	select {
	case <-waited:
		t.Fatal("Clients reached zero while a connection was being served")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("Clients never reached zero after the connection ended")
	}
	// After Shut, a connection is refused before establish.
	c := s.dial(t)
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("a connection after Shut was kept open")
	}
	if n := established.Load(); n != 1 {
		t.Errorf("establish ran %d times, want once (none after Shut)", n)
	}
}
