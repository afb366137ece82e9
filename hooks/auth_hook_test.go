package hooks

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/internal/mochi"
	"github.com/chatd/chatd/internal/testutil"
)

// authServer is a mochi server on loopback whose only hook is an Auth.
type authServer struct {
	srv  *mqtt.Server
	auth *Auth
	addr string
}

// startAuthServer serves an Auth configured as newAuthTest's, changed by
// mutate, on a loopback TCP listener, until the test ends.
func startAuthServer(t *testing.T, mutate func(*Auth)) *authServer {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := mqtt.New(&mqtt.Options{Logger: log})
	a := testAuth(srv, log, mutate)
	if err := srv.AddHook(a, nil); err != nil {
		t.Fatal(err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "t1", Address: "127.0.0.1:0"})
	// CloseClients as the server sets it: mochi v2.7.9's Close takes its
	// client map's read lock twice and deadlocks against a client
	// removed in between.
	if err := srv.AddListener(mochi.Guard{Listener: tcp, Timeout: 10 * time.Second, CloseClients: mochi.DisconnectOnShutdown(srv)}); err != nil {
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
	return &authServer{srv: srv, auth: a, addr: tcp.Address()}
}

// authToken returns a token for user signed with secret, valid for ttl.
func authToken(t *testing.T, secret []byte, user string, ttl time.Duration) string {
	t.Helper()
	tok, err := token.Mint(secret, user, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// authClient is a bare TCP connection speaking MQTT through mochi's codec.
type authClient struct {
	t       *testing.T
	conn    net.Conn
	r       *bufio.Reader
	version byte
}

// dialAuth connects to s without sending anything.
func dialAuth(t *testing.T, s *authServer, version byte) *authClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	return &authClient{t: t, conn: c, r: bufio.NewReader(c), version: version}
}

// write sends the packet encode writes.
func (rc *authClient) write(encode func(*bytes.Buffer) error) {
	rc.t.Helper()
	var buf bytes.Buffer
	if err := encode(&buf); err != nil {
		rc.t.Fatalf("encode: %v", err)
	}
	if _, err := rc.conn.Write(buf.Bytes()); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

// read reads one packet, decoding the types these tests expect.
func (rc *authClient) read() (packets.Packet, error) {
	pk := packets.Packet{ProtocolVersion: rc.version}
	b, err := rc.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(b); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(rc.r)
	if err != nil {
		return pk, err
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(rc.r, body); err != nil {
		return pk, err
	}
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	default:
		err = fmt.Errorf("unexpected packet type %d", pk.FixedHeader.Type)
	}
	return pk, err
}

// connect sends a CONNECT and returns the CONNACK.
func (rc *authClient) connect(clientID, user, password string, keepalive uint16) packets.Packet {
	rc.t.Helper()
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: rc.version,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: keepalive, ClientIdentifier: clientID,
			Username: []byte(user), UsernameFlag: true,
			// No password is no password field: mochi refuses an empty one itself.
			Password: []byte(password), PasswordFlag: password != "",
		},
	}
	rc.write(pk.ConnectEncode)
	ack, err := rc.read()
	if err != nil {
		rc.t.Fatalf("read CONNACK: %v", err)
	}
	if ack.FixedHeader.Type != packets.Connack {
		rc.t.Fatalf("got packet type %d, want CONNACK", ack.FixedHeader.Type)
	}
	return ack
}

// closedByServer fails the test unless the server closes the connection.
func (rc *authClient) closedByServer() {
	rc.t.Helper()
	_, err := io.Copy(io.Discard, rc.r)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		rc.t.Fatal("the server kept the connection open")
	}
}

// authVersions are the protocol levels tested, with their refusal codes.
var authVersions = []struct {
	name                  string
	level                 byte
	badID, badCredentials byte
}{
	{"3.1.1", 4, packets.Err3ClientIdentifierNotValid.Code, packets.Err3NotAuthorized.Code},
	{"5", 5, packets.ErrClientIdentifierNotValid.Code, packets.ErrBadUsernameOrPassword.Code},
}

// TestAuthConnack: a client ID that is not the user's is refused with
// "identifier rejected", a token that is not the user's, valid and
// signed with the server's secret with "bad username or password" (v5) or
// "not authorized" (3.1.1); a refused client holds no seat and its
// connection is closed.
func TestAuthConnack(t *testing.T) {
	s := startAuthServer(t, nil)
	good := authToken(t, testSecret, "bob", time.Hour)
	tests := []struct {
		name, clientID, user, password string
		want                           string // "ok", "bad id" or "bad credentials"
	}{
		{"device of the user", "bob/phone", "bob", good, "ok"},
		{"the user itself", "bob", "bob", good, "ok"},
		{"another user's device", "alice/phone", "bob", good, "bad id"},
		{"no device after the slash", "bob/", "bob", good, "bad id"},
		{"device name with a space", "bob/my phone", "bob", good, "bad id"},
		{"device name too long", "bob/" + string(bytes.Repeat([]byte("d"), 33)), "bob", good, "bad id"},
		{"bare device", "phone", "bob", good, "bad id"},
		{"not a token", "bob/phone", "bob", "not-a-token", "bad credentials"},
		{"no token", "bob/phone", "bob", "", "bad credentials"},
		{"another user's token", "bob/phone", "bob", authToken(t, testSecret, "alice", time.Hour), "bad credentials"},
		{"expired token", "bob/phone", "bob", authToken(t, testSecret, "bob", -time.Minute), "bad credentials"},
		{"token of another secret", "bob/phone", "bob", authToken(t, []byte("another-secret-0123456789-01234567"), "bob", time.Hour), "bad credentials"},
		{"username not a user ID", "bob smith", "bob smith", good, "bad credentials"},
	}
	for _, v := range authVersions {
		for _, tt := range tests {
			t.Run(v.name+"/"+tt.name, func(t *testing.T) {
				rc := dialAuth(t, s, v.level)
				ack := rc.connect(tt.clientID, tt.user, tt.password, 30)
				want := map[string]byte{"ok": 0, "bad id": v.badID, "bad credentials": v.badCredentials}[tt.want]
				if ack.ReasonCode != want {
					t.Fatalf("CONNACK code 0x%02x, want 0x%02x (%s)", ack.ReasonCode, want, tt.want)
				}
				if want == 0 {
					rc.conn.Close()
				} else {
					rc.closedByServer()
				}
				testutil.Eventually(t, 10*time.Second, func() bool { return s.auth.Users.Connections("bob") == 0 },
					"bob still holds a connection seat")
			})
		}
	}
}

// TestAuthKeepaliveCapped: a keepalive of 0 or over MaxKeepalive becomes
// MaxKeepalive, told to a v5 client as the Server Keep Alive; one within
// it is kept as asked.
func TestAuthKeepaliveCapped(t *testing.T) {
	s := startAuthServer(t, func(a *Auth) { a.MaxKeepalive = 60 })
	tok := authToken(t, testSecret, "bob", time.Hour)
	tests := []struct {
		asked, want uint16
		told        bool
	}{
		{30, 30, false},
		{60, 60, false},
		{0, 60, true},
		{61, 60, true},
		{600, 60, true},
	}
	for _, v := range authVersions {
		for i, tt := range tests {
			t.Run(fmt.Sprintf("%s/%d", v.name, tt.asked), func(t *testing.T) {
				id := fmt.Sprintf("bob/d%d", i)
				rc := dialAuth(t, s, v.level)
				ack := rc.connect(id, "bob", tok, tt.asked)
				if ack.ReasonCode != 0 {
					t.Fatalf("CONNACK code 0x%02x", ack.ReasonCode)
				}
				if v.level == 5 {
					if p := ack.Properties; p.ServerKeepAliveFlag != tt.told || (tt.told && p.ServerKeepAlive != tt.want) {
						t.Errorf("Server Keep Alive %v %d, want %v %d", p.ServerKeepAliveFlag, p.ServerKeepAlive, tt.told, tt.want)
					}
				}
				// The client is in mochi's map once its CONNACK is out; the
				// map's lock orders OnConnect's writes before this read.
				cl, ok := s.srv.Clients.Get(id)
				if !ok {
					t.Fatalf("%s is not in the server's client map", id)
				}
				if cl.State.Keepalive != tt.want {
					t.Errorf("server keepalive %d, want %d", cl.State.Keepalive, tt.want)
				}
			})
		}
	}
}

// TestAuthSubscribeACL: bob may subscribe to his own inbox and to
// presence topics, nothing else; past MaxSubscriptions only the filters
// he has already are granted again.
func TestAuthSubscribeACL(t *testing.T) {
	type filter struct {
		name    string
		granted bool
	}
	tests := []struct {
		name    string
		max     int
		filters []filter
	}{
		{"the protocol's filters", 16, []filter{
			{"inbox/bob", true},
			{"presence/alice", true},
			{"presence/bob", true},
			{"presence/+", true},
			{"presence/#", true},
			{"inbox/alice", false},
			{"inbox/+", false},
			{"inbox/#", false},
			{"presence/not a user", false},
			{"presence/alice/x", false},
			{"group/g1", false},
			{"typing/bob", false},
			{"receipt/bob", false},
			{"#", false},
			{"+/bob", false},
		}},
		{"the cap", 2, []filter{
			{"inbox/bob", true},
			{"presence/alice", true},
			{"presence/carol", false},
			{"presence/alice", true},
		}},
	}
	for _, v := range authVersions {
		for _, tt := range tests {
			t.Run(v.name+"/"+tt.name, func(t *testing.T) {
				s := startAuthServer(t, func(a *Auth) { a.MaxSubscriptions = tt.max })
				rc := dialAuth(t, s, v.level)
				if ack := rc.connect("bob/phone", "bob", authToken(t, testSecret, "bob", time.Hour), 30); ack.ReasonCode != 0 {
					t.Fatalf("CONNACK code 0x%02x", ack.ReasonCode)
				}
				refused := packets.ErrNotAuthorized.Code
				if v.level < 5 {
					refused = packets.ErrUnspecifiedError.Code // 0x80, the only 3.1.1 failure
				}
				// One filter a SUBSCRIBE, so that the cap counts in order.
				for i, f := range tt.filters {
					sub := packets.Packet{
						FixedHeader:     packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
						ProtocolVersion: v.level,
						PacketID:        uint16(i + 1),
						Filters:         packets.Subscriptions{{Filter: f.name, Qos: 1}},
					}
					rc.write(sub.SubscribeEncode)
					ack, err := rc.read()
					if err != nil {
						t.Fatalf("read SUBACK: %v", err)
					}
					if ack.FixedHeader.Type != packets.Suback || ack.PacketID != uint16(i+1) || len(ack.ReasonCodes) != 1 {
						t.Fatalf("got %+v, want the SUBACK of packet %d", ack, i+1)
					}
					want := refused
					if f.granted {
						want = 1
					}
					if got := ack.ReasonCodes[0]; got != want {
						t.Errorf("%s: SUBACK code 0x%02x, want 0x%02x", f.name, got, want)
					}
				}
			})
		}
	}
}

// TestAuthSeatReleased: however a connection ends, its seat is given
// back, so a user at a cap of one connection can always connect again,
// and Auth forgets the connection.
func TestAuthSeatReleased(t *testing.T) {
	tests := []struct {
		name string
		end  func(t *testing.T, s *authServer, rc *authClient)
	}{
		{"DISCONNECT", func(t *testing.T, s *authServer, rc *authClient) {
			rc.write((&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: rc.version}).DisconnectEncode)
			rc.closedByServer()
		}},
		{"connection closed", func(t *testing.T, s *authServer, rc *authClient) {
			rc.conn.Close()
		}},
		{"taken over", func(t *testing.T, s *authServer, rc *authClient) {
			// A takeover is recognised once the first connection's
			// session is established, which comes after its CONNACK.
			testutil.Eventually(t, 10*time.Second, func() bool { return s.auth.Connected("bob/phone") },
				"bob/phone never established")
			next := dialAuth(t, s, rc.version)
			if ack := next.connect("bob/phone", "bob", authToken(t, testSecret, "bob", time.Hour), 30); ack.ReasonCode != 0 {
				t.Fatalf("takeover: CONNACK code 0x%02x", ack.ReasonCode)
			}
			rc.closedByServer()
			testutil.Eventually(t, 10*time.Second, func() bool { return s.auth.Users.Connections("bob") == 1 },
				"the taken-over connection kept its seat")
			next.conn.Close()
		}},
	}
	for _, v := range authVersions {
		for _, tt := range tests {
			t.Run(v.name+"/"+tt.name, func(t *testing.T) {
				s := startAuthServer(t, func(a *Auth) { a.Users.MaxConnections = 1 })
				tok := authToken(t, testSecret, "bob", time.Hour)
				rc := dialAuth(t, s, v.level)
				if ack := rc.connect("bob/phone", "bob", tok, 30); ack.ReasonCode != 0 {
					t.Fatalf("CONNACK code 0x%02x", ack.ReasonCode)
				}
				if n := s.auth.Users.Connections("bob"); n != 1 {
					t.Fatalf("%d seats held, want 1", n)
				}
				tt.end(t, s, rc)
				testutil.Eventually(t, 10*time.Second, func() bool {
					return s.auth.Users.Connections("bob") == 0 && s.auth.admittedCount() == 0 && !s.auth.Connected("bob/phone")
				}, "the ended connection is still counted")
				again := dialAuth(t, s, v.level)
				if ack := again.connect("bob/tablet", "bob", tok, 30); ack.ReasonCode != 0 {
					t.Fatalf("connecting again: CONNACK code 0x%02x", ack.ReasonCode)
				}
			})
		}
	}
}
