package hooks

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/time/rate"

	"github.com/chatd/chatd/broker/protocol/token"
)

var testSecret = []byte("test-secret-0123456789-0123456789")

// authTest is an Auth hook on a real mochi server, with the checks that
// Auth asks of the rest of chatd answered by the test.
type authTest struct {
	t    *testing.T
	srv  *mqtt.Server
	auth *Auth
	tok  string
}

// testAuth is the Auth the hook tests run, on srv, changed by mutate:
// every device may attach, and the limits are far above the tests' use.
func testAuth(srv *mqtt.Server, log *slog.Logger, mutate func(*Auth)) *Auth {
	a := &Auth{
		Server:           srv,
		Verifier:         token.NewVerifier(testSecret),
		MaxSubscriptions: 16,
		MaxKeepalive:     60,
		Connects:         rate.NewLimiter(rate.Inf, 1),
		Users:            &Users{MaxConnections: 16, PublishRate: 10, PublishBytesRate: 1 << 20},
		MayAttach:        func(string, string) (bool, error) { return true, nil },
		Log:              log,
	}
	if mutate != nil {
		mutate(a)
	}
	return a
}

func newAuthTest(t *testing.T, mutate func(*Auth)) *authTest {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := mqtt.New(&mqtt.Options{Logger: log})
	a := testAuth(srv, log, mutate)
	tok, err := token.Mint(testSecret, "bob", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &authTest{t: t, srv: srv, auth: a, tok: tok}
}

// connect runs OnConnect for a v3.1.1 CONNECT of clientID of bob on a new
// in-memory connection, whose far end discards what the server writes
// (its CONNACK refusals). It returns the client, its connection and what
// OnConnect returned.
func (at *authTest) connect(clientID string) (*mqtt.Client, net.Conn, error) {
	near, far := net.Pipe()
	go func() { _, _ = io.Copy(io.Discard, far) }()
	at.t.Cleanup(func() { near.Close(); far.Close() })
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID,
			Username: []byte("bob"), UsernameFlag: true, Password: []byte(at.tok), PasswordFlag: true,
		},
	}
	cl := at.srv.NewClient(near, "tcp", "", false)
	cl.ParseConnect("tcp", pk)
	return cl, near, at.auth.OnConnect(cl, pk)
}

// TestRefusedConnectsAreForgotten: a client refused after its token was
// checked (mochi runs no disconnect hook for it) leaves nothing behind in
// Auth or in the user's counts, however many times it tries.
func TestRefusedConnectsAreForgotten(t *testing.T) {
	for _, tt := range []struct {
		name   string
		mutate func(*Auth)
	}{
		{"connect rate", func(a *Auth) { a.Connects = rate.NewLimiter(0, 0) }},
		{"connections per user", func(a *Auth) { a.Users.MaxConnections = 0 }},
		{"devices per user", func(a *Auth) {
			a.MayAttach = func(string, string) (bool, error) { return false, nil }
		}},
		{"device check failing", func(a *Auth) {
			a.MayAttach = func(string, string) (bool, error) { return false, errors.New("store down") }
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			at := newAuthTest(t, tt.mutate)
			for i := range 200 {
				if _, _, err := at.connect(fmt.Sprintf("bob/d%d", i)); err == nil {
					t.Fatalf("connect %d accepted", i)
				}
			}
			if n := at.auth.admittedCount(); n != 0 {
				t.Errorf("Auth holds %d refused clients", n)
			}
			if n := at.auth.Users.size(); n != 0 {
				t.Errorf("%d users have state after refusals only", n)
			}
		})
	}
}

// TestAdmittedClientForgottenOnce: what OnConnect holds for an admitted
// client (its seat, its token expiry) is freed by OnDisconnect or by
// Ended, whichever comes first, and only once.
func TestAdmittedClientForgottenOnce(t *testing.T) {
	for _, tt := range []struct {
		name string
		end  func(a *Auth, cl *mqtt.Client, conn net.Conn)
	}{
		{"disconnect then end", func(a *Auth, cl *mqtt.Client, conn net.Conn) {
			a.OnDisconnect(cl, nil, false)
			a.Ended(conn)
		}},
		{"end only", func(a *Auth, _ *mqtt.Client, conn net.Conn) {
			a.Ended(conn)
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			at := newAuthTest(t, func(a *Auth) { a.Users.MaxConnections = 2 })
			other, _, err := at.connect("bob/other")
			if err != nil {
				t.Fatal(err)
			}
			cl, conn, err := at.connect("bob/a")
			if err != nil {
				t.Fatal(err)
			}
			if exp, ok := at.auth.TokenExpiry(cl); !ok || time.Until(exp) < 59*time.Minute {
				t.Fatalf("token expiry %v, %v; want in an hour", exp, ok)
			}
			if n := at.auth.Users.Connections("bob"); n != 2 {
				t.Fatalf("%d connections counted, want 2", n)
			}
			tt.end(at.auth, cl, conn)
			if _, ok := at.auth.TokenExpiry(cl); ok {
				t.Error("token expiry kept after the connection ended")
			}
			if n := at.auth.admittedCount(); n != 1 {
				t.Errorf("Auth holds %d clients, want the other one", n)
			}
			if n := at.auth.Users.Connections("bob"); n != 1 {
				t.Errorf("%d connections counted, want 1", n)
			}
			at.auth.OnDisconnect(other, nil, false)
			if n := at.auth.Users.Connections("bob"); n != 0 {
				t.Errorf("%d connections counted after both ended, want 0", n)
			}
		})
	}
}

// TestConnectCapIsAtomic: parallel CONNECTs of distinct devices cannot
// all pass the per-user cap; a device taking its own session over can.
func TestConnectCapIsAtomic(t *testing.T) {
	const tries, limit = 40, 16
	at := newAuthTest(t, func(a *Auth) { a.Users.MaxConnections = limit })
	var wg sync.WaitGroup
	errs := make([]error, tries)
	for i := range tries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, errs[i] = at.connect(fmt.Sprintf("bob/d%d", i))
		}()
	}
	wg.Wait()
	accepted := 0
	for _, err := range errs {
		if err == nil {
			accepted++
		}
	}
	if accepted != limit {
		t.Fatalf("%d of %d parallel connects accepted, want %d", accepted, tries, limit)
	}
	// bob/d0 has a live session, which a new connection takes over.
	at.auth.live.Store("bob/d0", &mqtt.Client{})
	if _, _, err := at.connect("bob/d0"); err != nil {
		t.Fatalf("takeover past the cap refused: %v", err)
	}
	if _, _, err := at.connect("bob/new"); err == nil {
		t.Fatal("a new device past the cap accepted")
	}
}

// TestEmptyClientIDIsTheUser: a client with an empty client ID is given
// the user ID, and an MQTT 5 client is told so in its CONNACK.
func TestEmptyClientIDIsTheUser(t *testing.T) {
	at := newAuthTest(t, nil)
	cl, _, err := at.connect("")
	if err != nil {
		t.Fatal(err)
	}
	if cl.ID != "bob" || cl.Properties.Props.AssignedClientID != "bob" {
		t.Fatalf("client id %q, assigned %q; want bob", cl.ID, cl.Properties.Props.AssignedClientID)
	}
}
