// Package natsnode gives the cluster mode its NATS JetStream: it starts an
// embedded nats-server with JetStream, alone or routed to peer nodes, or
// connects to an existing NATS cluster, and hands back a client connection
// and a JetStream context once JetStream can serve requests.
package natsnode

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DefaultReadyTimeout bounds Start when Config.ReadyTimeout is zero.
const DefaultReadyTimeout = 30 * time.Second

// DefaultSyncInterval is nats-server's own fsync interval, which an
// embedded server keeps when Config.SyncInterval is zero.
const DefaultSyncInterval = 2 * time.Minute

// Config says which NATS to run or join. With URL set, Start only
// connects and every server field is ignored.
type Config struct {
	// URL connects to an existing NATS server or cluster (comma-separated
	// URLs) instead of starting one.
	URL string

	// Name is this server's name; it must be unique in its cluster and
	// stay the same across restarts, as JetStream's Raft groups know peers by it.
	Name string
	// Dir is where JetStream keeps its streams (file storage).
	Dir string
	// Listen is the client address, host:port; port 0 picks a free port.
	Listen string
	// ClusterName is shared by every peer; empty runs a single node.
	ClusterName string
	// ClusterListen is the address peers route to, host:port; port 0 picks a free port.
	ClusterListen string
	// Routes are the peers' route URLs (nats://host:port of their
	// ClusterListen); this node's own URL may be listed, and is skipped.
	Routes []string
	// SyncAlways fsyncs every JetStream write before it is acknowledged
	// (for a replicated stream: its Raft log on each replica). Without it
	// a replicated stream relies on its other replicas for a crash of one
	// node, and a single node may lose the last SyncInterval of writes to
	// a power loss. broker derives it from chatd's queue.sync.
	SyncAlways bool
	// SyncInterval is how often JetStream fsyncs in the background; 0
	// keeps the server default, DefaultSyncInterval.
	SyncInterval time.Duration
	// MaxMemory and MaxStore cap JetStream's memory and disk use in bytes;
	// 0 keeps the server defaults (a share of the machine's memory and disk).
	MaxMemory, MaxStore int64

	// Password, if set, is asked of every client and route of the
	// embedded server, as user AuthUser; the node's own connection, its
	// routes and a joined URL use it too. Every node has the same.
	Password string
	// CredsFile is a NATS credentials file to join URL with.
	CredsFile string
	// TLS, if set, encrypts the embedded server's client port and routes,
	// routes authenticated both ways by certificates its CA signs, and
	// the connection to URL.
	TLS *TLSFiles

	// ReadyTimeout bounds how long Start waits for the server, the
	// JetStream meta leader and the connection; 0 means DefaultReadyTimeout.
	ReadyTimeout time.Duration
	// Logger receives the server's and the connection's logs; nil means slog.Default().
	Logger *slog.Logger
}

// AuthUser is the NATS user of Config.Password.
const AuthUser = "chatd"

// TLSFiles are the PEM files of Config.TLS.
type TLSFiles struct {
	// CertFile and KeyFile are this node's certificate chain and key.
	CertFile, KeyFile string
	// CAFile holds the CAs that sign the nodes' (and URL's) certificates.
	CAFile string
}

// Node is a running or joined NATS with JetStream.
type Node struct {
	srv  *server.Server // nil when joined by URL
	nc   *nats.Conn
	js   jetstream.JetStream
	once sync.Once
}

// Conn returns the client connection; it reconnects to the cluster's other
// servers when its own goes away.
func (n *Node) Conn() *nats.Conn { return n.nc }

// JetStream returns a JetStream context on Conn.
func (n *Node) JetStream() jetstream.JetStream { return n.js }

// Server returns the embedded server, or nil when joined by URL.
func (n *Node) Server() *server.Server { return n.srv }

// ClientURL returns the URL clients reach the embedded server at, or the
// URL connected to when joined by URL.
func (n *Node) ClientURL() string {
	if n.srv == nil {
		return n.nc.ConnectedUrl()
	}
	return n.srv.ClientURL()
}

// ClusterURL returns the route URL peers reach the embedded server at, or
// "" without a cluster.
func (n *Node) ClusterURL() string {
	if n.srv == nil {
		return ""
	}
	a := n.srv.ClusterAddr()
	if a == nil {
		return ""
	}
	return "nats://" + a.String()
}

// Start runs or joins NATS as cfg says and returns once JetStream answers:
// for an embedded cluster node, once the JetStream meta group has a leader,
// which needs a quorum of the peers up, so the first nodes of a new
// cluster must be started side by side, not one after another.
func Start(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = DefaultReadyTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.ReadyTimeout)
	defer cancel()
	if cfg.URL != "" {
		n, err := connect(ctx, cfg, cfg.URL, false)
		if err != nil {
			return nil, err
		}
		// A joined server fsyncs as its own configuration says
		// (jetstream.sync_interval), whatever chatd's queue.sync is.
		cfg.Logger.Warn("joined an external NATS: how often JetStream fsyncs, and so what a PUBACK survives, is that server's jetstream sync_interval, not queue.sync",
			"url", n.nc.ConnectedUrlRedacted())
		return n, nil
	}
	opts, err := serverOptions(cfg)
	if err != nil {
		return nil, err
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats server %s: %w", cfg.Name, err)
	}
	srv.SetLoggerV2(serverLogger{cfg.Logger.With("component", "nats", "server", cfg.Name)}, false, false, false)
	srv.Start()
	stop := func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}
	if err := waitReady(ctx, srv, cfg); err != nil {
		stop()
		return nil, err
	}
	n, err := connect(ctx, cfg, srv.ClientURL(), true)
	if err != nil {
		stop()
		return nil, err
	}
	n.srv = srv
	if jsc := srv.JetStreamConfig(); jsc != nil {
		cfg.Logger.Info("JetStream fsync", "sync_always", jsc.SyncAlways, "sync_interval", jsc.SyncInterval)
	}
	return n, nil
}

// waitReady waits for the listeners and, in a cluster, for a JetStream
// meta leader this server is caught up with.
func waitReady(ctx context.Context, srv *server.Server, cfg Config) error {
	const step = 50 * time.Millisecond
	for !srv.ReadyForConnections(step) {
		if ctx.Err() != nil {
			return fmt.Errorf("nats server %s not listening on %s within %v (see its log for the listen error)", cfg.Name, cfg.Listen, cfg.ReadyTimeout)
		}
	}
	if !srv.JetStreamEnabled() {
		return fmt.Errorf("nats server %s started without JetStream (see its log)", cfg.Name)
	}
	t := time.NewTicker(step)
	defer t.Stop()
	for !srv.JetStreamIsCurrent() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("nats server %s: no JetStream meta leader within %v; a quorum of the %d configured peers of cluster %q must be up",
				cfg.Name, cfg.ReadyTimeout, len(cfg.Routes), cfg.ClusterName)
		case <-t.C:
		}
	}
	return nil
}

// connect dials url (the embedded server's own, or a joined one) and
// waits until the JetStream API answers.
func connect(ctx context.Context, cfg Config, url string, embedded bool) (*Node, error) {
	log := cfg.Logger.With("component", "nats-client")
	auth, err := clientAuth(cfg, embedded)
	if err != nil {
		return nil, err
	}
	nc, err := nats.Connect(url, append(auth,
		nats.Name("chatd "+cfg.Name),
		// A node of the cluster going away is routine: keep trying the others.
		nats.MaxReconnects(-1),
		nats.ReconnectWait(100*time.Millisecond),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("disconnected", "error", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) { log.Info("reconnected", "url", c.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(func(_ *nats.Conn, s *nats.Subscription, err error) {
			subj := ""
			if s != nil {
				subj = s.Subject
			}
			log.Error("async error", "subject", subj, "error", err)
		}),
	)...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats %s: %w", url, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("jetstream on %s: %w", url, err)
	}
	// The meta leader answers account info in a cluster: this is the
	// client's own proof that JetStream is usable, also for a joined cluster.
	for {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		_, err = js.AccountInfo(actx)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			nc.Close()
			return nil, fmt.Errorf("jetstream at %s not available within %v: %w", url, cfg.ReadyTimeout, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
	return &Node{nc: nc, js: js}, nil
}

// clientAuth returns the options that authenticate a connection: the
// password or credentials file, and TLS. The embedded server's own
// connection dials its listen address, which its certificate need not
// name: it checks the certificate against the name the certificate
// gives itself instead.
func clientAuth(cfg Config, embedded bool) ([]nats.Option, error) {
	var opts []nats.Option
	if cfg.Password != "" {
		opts = append(opts, nats.UserInfo(AuthUser, cfg.Password))
	}
	if cfg.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(cfg.CredsFile))
	}
	if cfg.TLS == nil {
		return opts, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.TLS.CAFile != "" {
		pem, err := os.ReadFile(cfg.TLS.CAFile)
		if err != nil {
			return nil, fmt.Errorf("natsnode: TLS CA: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("natsnode: TLS CA: no certificate in %s", cfg.TLS.CAFile)
		}
	}
	if cfg.TLS.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLS.CertFile, cfg.TLS.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("natsnode: TLS certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
		if embedded {
			name, err := certName(cert)
			if err != nil {
				return nil, err
			}
			tc.ServerName = name
		}
	}
	return append(opts, nats.Secure(tc)), nil
}

// certName is a name cert is valid for: its first DNS name, else its
// first IP address.
func certName(cert tls.Certificate) (string, error) {
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return "", fmt.Errorf("natsnode: TLS certificate: %w", err)
	}
	switch {
	case len(leaf.DNSNames) > 0:
		return leaf.DNSNames[0], nil
	case len(leaf.IPAddresses) > 0:
		return leaf.IPAddresses[0].String(), nil
	}
	return "", errors.New("natsnode: TLS certificate names no DNS name or IP address")
}

// serverOptions turns cfg into nats-server options.
func serverOptions(cfg Config) (*server.Options, error) {
	if cfg.Dir == "" {
		return nil, errors.New("natsnode: Dir is required to run an embedded server")
	}
	host, port, err := hostPort(cfg.Listen, "127.0.0.1")
	if err != nil {
		return nil, fmt.Errorf("natsnode: Listen: %w", err)
	}
	opts := &server.Options{
		ServerName:         cfg.Name,
		Host:               host,
		Port:               port,
		JetStream:          true,
		StoreDir:           cfg.Dir,
		JetStreamMaxMemory: cfg.MaxMemory,
		JetStreamMaxStore:  cfg.MaxStore,
		SyncAlways:         cfg.SyncAlways,
		SyncInterval:       cfg.SyncInterval,
		// The embedding process owns signals and its own logging.
		NoSigs: true,
	}
	if cfg.Password != "" {
		opts.Username, opts.Password = AuthUser, cfg.Password
	}
	if cfg.TLS != nil {
		// Clients prove who they are by the password, not a certificate.
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: cfg.TLS.CertFile, KeyFile: cfg.TLS.KeyFile, CaFile: cfg.TLS.CAFile})
		if err != nil {
			return nil, fmt.Errorf("natsnode: TLS: %w", err)
		}
		opts.TLSConfig, opts.TLS, opts.TLSTimeout = tc, true, tlsTimeout
	}
	if cfg.ClusterName == "" {
		return opts, nil
	}
	if cfg.Name == "" {
		return nil, errors.New("natsnode: Name is required in a cluster")
	}
	chost, cport, err := hostPort(cfg.ClusterListen, host)
	if err != nil {
		return nil, fmt.Errorf("natsnode: ClusterListen: %w", err)
	}
	opts.Cluster = server.ClusterOpts{Name: cfg.ClusterName, Host: chost, Port: cport}
	if cfg.Password != "" {
		opts.Cluster.Username, opts.Cluster.Password = AuthUser, cfg.Password
	}
	if cfg.TLS != nil {
		// Routes: each side checks the other's certificate against the CA.
		rc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: cfg.TLS.CertFile, KeyFile: cfg.TLS.KeyFile, CaFile: cfg.TLS.CAFile, Verify: true})
		if err != nil {
			return nil, fmt.Errorf("natsnode: route TLS: %w", err)
		}
		// A node both dials and accepts routes: the CA checks both ends,
		// as nats-server's own configuration file sets it up.
		rc.RootCAs = rc.ClientCAs
		opts.Cluster.TLSConfig, opts.Cluster.TLSTimeout = rc, tlsTimeout
	}
	for _, r := range cfg.Routes {
		u, err := url.Parse(r)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("natsnode: route %q is not a URL like nats://host:port", r)
		}
		if cfg.Password != "" && u.User == nil {
			u.User = url.UserPassword(AuthUser, cfg.Password)
		}
		opts.Routes = append(opts.Routes, u)
	}
	return opts, nil
}

// tlsTimeout bounds a TLS handshake, in seconds (nats-server's unit).
const tlsTimeout = 5

// hostPort splits addr; an empty host means def and port 0 a free port
// (nats-server itself reads 0 as its default port).
func hostPort(addr, def string) (string, int, error) {
	if addr == "" {
		return def, server.RANDOM_PORT, nil
	}
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%q: %w", addr, err)
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("%q: bad port", addr)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	if strings.TrimSpace(h) == "" {
		h = def
	}
	return h, port, nil
}

// Shutdown closes the connection and stops the embedded server, waiting
// until it has stopped. It is safe to call more than once.
func (n *Node) Shutdown() {
	n.once.Do(func() {
		n.nc.Close()
		if n.srv != nil {
			n.srv.Shutdown()
			n.srv.WaitForShutdown()
		}
	})
}
