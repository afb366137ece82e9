package broker

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
)

var testSecret = []byte("test-secret-0123456789-0123456789")

// startServer runs a real server on loopback with its data in dir.
func startServer(t testing.TB, dir string, mutate func(*config.Config)) *Server {
	t.Helper()
	return startServerAt(t, dir, nil, mutate)
}

// testClock is a server clock a test moves forward instead of waiting:
// the wall clock plus what Advance added.
type testClock struct{ ahead atomic.Int64 }

// Now returns the clock's time.
func (c *testClock) Now() time.Time { return time.Now().Add(time.Duration(c.ahead.Load())) }

// Advance moves the clock forward by d.
func (c *testClock) Advance(d time.Duration) { c.ahead.Add(int64(d)) }

// startServerAt is startServer on the clock now (nil: the wall clock).
func startServerAt(t testing.TB, dir string, now func() time.Time, mutate func(*config.Config)) *Server {
	t.Helper()
	cfg := config.Default()
	cfg.DataDir = dir
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = "127.0.0.1:0"
	// Tests publish in bursts far beyond a phone's; the rate limits have a test of their own.
	cfg.Limits.PublishRate = 1e6
	cfg.Limits.PublishBytesRate = 1 << 30
	cfg.Limits.ConnectRate = 1e6
	// The disk reserve has a test of its own; the others must not depend
	// on how full the machine's disk is.
	cfg.Queue.MinFreeBytes = 1 << 20
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := New(Options{Config: cfg, Secret: testSecret, Now: now, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("new server: %v", err)
	}
	if err := s.Start(); err != nil {
		t.Fatalf("start server: %v", err)
	}
	t.Cleanup(func() { stopServer(t, s) })
	return s
}

func stopServer(t testing.TB, s *Server) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Errorf("close server: %v", err)
	}
}

func mint(t testing.TB, user string) string {
	t.Helper()
	tok, err := token.Mint(testSecret, user, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// envelopeMsg is the delivered envelope of PROTOCOL.md section 3.
type envelopeMsg struct {
	Kind   string          `json:"kind"`
	From   string          `json:"from"`
	To     string          `json:"to"`
	TS     int64           `json:"ts"`
	Msg    json.RawMessage `json:"msg"`
	Ref    string          `json:"ref"`
	Code   string          `json:"code"`
	Reason string          `json:"reason"`
	// Server marks a message a backend sent through the server API.
	Server bool `json:"server"`
}

// phone is a paho v3 client recording what its inbox receives.
type phone struct {
	t      testing.TB
	user   string
	client paho.Client
	mu     sync.Mutex
	got    []envelopeMsg
	raw    [][]byte
	signal chan struct{}
	// hold, when set, makes the handler block, so no PUBACK is sent.
	hold chan struct{}
}

type phoneOpt struct {
	clientID  string
	clean     bool
	noSub     bool
	password  string
	manualAck bool
}

func dial(t testing.TB, s *Server, user string, o phoneOpt) (*phone, error) {
	t.Helper()
	p := &phone{t: t, user: user, signal: make(chan struct{}, 1)}
	id := o.clientID
	if id == "" {
		id = user
	}
	pw := o.password
	if pw == "" {
		pw = mint(t, user)
	}
	opts := paho.NewClientOptions().
		AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID(id).SetUsername(user).SetPassword(pw).
		SetCleanSession(o.clean).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetOrderMatters(true).
		SetConnectTimeout(5 * time.Second)
	if o.manualAck {
		opts.SetAutoAckDisabled(true)
	}
	// A device that subscribed on an earlier connection is fed as soon as
	// it connects, before it subscribes again: like any client of a
	// persistent session, it needs a handler from the start.
	opts.SetDefaultPublishHandler(p.handle)
	c := paho.NewClient(opts)
	tk := c.Connect()
	if !tk.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect %s: timeout", user)
	}
	if err := tk.Error(); err != nil {
		return nil, err
	}
	p.client = c
	t.Cleanup(func() { c.Disconnect(100) })
	if !o.noSub {
		st := c.Subscribe("inbox/"+user, 1, p.handle)
		if !st.WaitTimeout(10*time.Second) || st.Error() != nil {
			return nil, fmt.Errorf("subscribe %s: %v", user, st.Error())
		}
	}
	return p, nil
}

func mustDial(t testing.TB, s *Server, user string, o phoneOpt) *phone {
	t.Helper()
	p, err := dial(t, s, user, o)
	if err != nil {
		t.Fatalf("dial %s: %v", user, err)
	}
	return p
}

func (p *phone) handle(_ paho.Client, m paho.Message) {
	if p.hold != nil {
		<-p.hold
	}
	var e envelopeMsg
	if err := json.Unmarshal(m.Payload(), &e); err != nil {
		p.t.Errorf("%s received a non-JSON payload %q: %v", p.user, m.Payload(), err)
	}
	p.mu.Lock()
	p.got = append(p.got, e)
	p.raw = append(p.raw, append([]byte(nil), m.Payload()...))
	p.mu.Unlock()
	select {
	case p.signal <- struct{}{}:
	default:
	}
}

// send publishes a message object with id to user's inbox and waits for the PUBACK.
func (p *phone) send(to, id string, extra string) {
	p.t.Helper()
	payload := fmt.Sprintf(`{"id":%q%s}`, id, extra)
	p.publish("inbox/"+to, []byte(payload))
}

func (p *phone) publish(topicName string, payload []byte) {
	p.t.Helper()
	tk := p.client.Publish(topicName, 1, false, payload)
	if !tk.WaitTimeout(10 * time.Second) {
		p.t.Fatalf("%s: publish to %s: no PUBACK", p.user, topicName)
	}
	if err := tk.Error(); err != nil {
		p.t.Fatalf("%s: publish to %s: %v", p.user, topicName, err)
	}
}

// waitFor waits until the phone has received n messages and returns them.
func (p *phone) waitFor(n int) []envelopeMsg {
	p.t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		p.mu.Lock()
		if len(p.got) >= n {
			out := append([]envelopeMsg(nil), p.got...)
			p.mu.Unlock()
			return out
		}
		have := len(p.got)
		p.mu.Unlock()
		select {
		case <-p.signal:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			p.t.Fatalf("%s: got %d messages, want %d", p.user, have, n)
		}
	}
}

// ids returns the msg ids received so far, in order.
func (p *phone) ids() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.got))
	for _, e := range p.got {
		var m struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal(e.Msg, &m); err == nil {
			out = append(out, m.ID)
		} else {
			out = append(out, "")
		}
	}
	return out
}

// count returns how many messages the phone has received.
func (p *phone) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.got)
}

func decodeEnvelope(t testing.TB, b []byte) envelopeMsg {
	t.Helper()
	var e envelopeMsg
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("envelope %q: %v", b, err)
	}
	return e
}

func innerID(t testing.TB, e envelopeMsg) string {
	t.Helper()
	var m struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(e.Msg, &m); err != nil {
		t.Fatalf("msg %q: %v", e.Msg, err)
	}
	return m.ID
}

// bufferedConn gives paho a buffered reader: paho reads each packet's
// header a byte at a time, one system call each, which would make the
// benchmark client, not the server, the bottleneck.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func dialBuffered(uri *url.URL, _ paho.ClientOptions) (net.Conn, error) {
	c, err := net.Dial("tcp", uri.Host)
	if err != nil {
		return nil, err
	}
	return bufferedConn{Conn: c, r: bufio.NewReaderSize(c, 64<<10)}, nil
}

// freeAddr returns a loopback address with a port free at the time of the call.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// connectPacket encodes a v3.1.1 CONNECT with username and password user
// and token, clean session, keepalive seconds, and a retained QoS 1 Will
// when willTopic is set: what a test needs that paho will not send.
func connectPacket(user, token string, keepalive uint16, willTopic, willMsg string) []byte {
	var body bytes.Buffer
	str := func(v string) { body.Write([]byte{byte(len(v) >> 8), byte(len(v))}); body.WriteString(v) }
	str("MQTT")
	flags := byte(0xC2) // username, password, clean session
	if willTopic != "" {
		flags |= 0x04 | 0x08 | 0x20 // Will, QoS 1, retained
	}
	body.Write([]byte{4, flags, byte(keepalive >> 8), byte(keepalive)})
	str(user)
	if willTopic != "" {
		str(willTopic)
		str(willMsg)
	}
	str(user)
	str(token)
	pkt := []byte{0x10}
	for n := body.Len(); ; {
		c := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			c |= 0x80
		}
		pkt = append(pkt, c)
		if n == 0 {
			break
		}
	}
	return append(pkt, body.Bytes()...)
}

// httpCall makes an HTTP call to s with client (nil: the default one),
// the headers hdr and body, and returns the answer, its body read.
func httpCall(t testing.TB, client *http.Client, s *Server, method, path string, hdr http.Header, body io.Reader) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+s.HTTPAddr()+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp, b
}

// bearerCall makes an HTTP call to s with bearer in Authorization (none
// when "") and body, and returns the status and the body.
func bearerCall(t testing.TB, s *Server, method, path, bearer, body string) (int, []byte) {
	t.Helper()
	hdr := http.Header{}
	if bearer != "" {
		hdr.Set("Authorization", "Bearer "+bearer)
	}
	resp, b := httpCall(t, nil, s, method, path, hdr, strings.NewReader(body))
	return resp.StatusCode, b
}
