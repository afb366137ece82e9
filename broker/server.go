// Package broker assembles chatd: the mochi MQTT broker, the hooks, the
// durable queue, delivery and the HTTP listener.
package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"golang.org/x/time/rate"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/peers"
	"github.com/chatd/chatd/broker/metrics"
	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/presence"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/broker/service/apidoc"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/bans"
	"github.com/chatd/chatd/broker/service/beforesend"
	"github.com/chatd/chatd/broker/service/bots"
	"github.com/chatd/chatd/broker/service/deviceapi"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/broker/service/httpjson"
	"github.com/chatd/chatd/broker/service/media"
	"github.com/chatd/chatd/broker/service/push"
	"github.com/chatd/chatd/broker/service/revocations"
	"github.com/chatd/chatd/broker/service/serverapi"
	"github.com/chatd/chatd/broker/service/webapp"
	"github.com/chatd/chatd/broker/service/webhook"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/hooks"
	"github.com/chatd/chatd/internal/mochi"
)

// Options configures a Server.
type Options struct {
	// Config is the validated configuration.
	Config config.Config
	// Secret is the HS256 token key.
	Secret []byte
	// Logger receives the server's logs; nil means slog.Default().
	Logger *slog.Logger
	// Now is the clock of message_ttl, device_ttl, media.ttl and envelope
	// timestamps; nil means time.Now. Tests move it forward instead of
	// waiting. Timers (keepalive, flush intervals) run on the wall clock.
	Now func() time.Time
}

// Server is one chatd node.
type Server struct {
	cfg   config.Config
	log   *slog.Logger
	now   func() time.Time
	queue queue.Store
	// cluster is set in cluster mode.
	cluster  *cluster
	path     *msgpath.Path
	mqtt     *mqtt.Server
	presence *presence.Tracker
	groups   *groups.Store
	keys     apikeys.Store
	apiDoc   http.Handler
	bans     *bans.Store
	// revocations are the revoked tokens.
	revocations *revocations.Store
	push        *push.Notifier
	events      *events.Emitter
	// botList is the bots served by webhooks; bell wakes their consumers
	// (nil without bots).
	botList []bots.Bot
	bell    *bots.Bell
	// bots runs the bots' webhook consumers from Start, nil before.
	bots     *bots.Runner
	metrics  *metrics.Metrics
	inbox    *hooks.Inbox
	auth     *hooks.Auth
	media    *media.Handler
	verifier *token.Verifier
	// devSecret signs development sign-ins (web.dev); nil otherwise.
	devSecret []byte
	// stopJanitor ends the media janitor; janitorDone closes when it has.
	stopJanitor context.CancelFunc
	janitorDone chan struct{}
	tcp         *listeners.TCP
	tls         *listeners.TCP
	ws          *mochi.WebSocket
	// started is when Start ran.
	started time.Time
	http    *http.Server
	httpLn  net.Listener
	closed  sync.Once
	// stopping is set as Close begins, for /readyz.
	stopping atomic.Bool
	// cert is the TLS listeners' certificate, which Reload replaces.
	cert atomic.Pointer[tls.Certificate]
	// reloading serializes Reload, and reloaded is the configuration the
	// last one applied (cfg until the first).
	reloading sync.Mutex
	reloaded  config.Config
	// users and connects are the limits Reload changes.
	users    *hooks.Users
	connects *rate.Limiter
	closeErr error
	// ended orders connection ends before shutdown (see mochi.Ends).
	ended mochi.Ends
}

// APIKeysBucket is the JetStream KV bucket of the API keys in cluster mode.
const APIKeysBucket = clusterPrefix + "_apikeys"

// RevocationsBucket is the JetStream KV bucket of the revoked tokens in
// cluster mode.
const RevocationsBucket = clusterPrefix + "_revocations"

// LeasesBucket is the JetStream KV bucket of the leases that let one
// node at a time run a task (a bot's consumer) in cluster mode.
const LeasesBucket = clusterPrefix + "_leases"

// leaseTTL is how long a crashed node's leases outlive it.
const leaseTTL = 10 * time.Second

// queueDir is the Badger directory inside the data dir.
const queueDir = "queue"

// mediaJanitorEvery is how often expired media is deleted.
const mediaJanitorEvery = 10 * time.Minute

// New builds a node in dependency order, each part from the parts built
// before it: the metrics, the store (and in a cluster NATS and the bus
// that sends to peers), groups, push, mochi, presence, the message path,
// the hooks, media; then it binds the MQTT listeners, so that a port in
// use fails here. Start restores presence, joins the cluster and serves.
func New(opts Options) (*Server, error) {
	cfg := opts.Config
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if len(opts.Secret) == 0 {
		return nil, errors.New("no token secret")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir %s: %w", cfg.DataDir, err)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	verifier, err := token.New(opts.Secret, cfg.Auth.Issuers, token.Options{Leeway: cfg.Auth.Leeway, Logger: log.With("component", "auth")})
	if err != nil {
		return nil, fmt.Errorf("auth.issuers: %w", err)
	}
	s := &Server{cfg: cfg, reloaded: cfg, log: log, now: now, verifier: verifier, metrics: metrics.New()}
	s.metrics.Build(BuildInfo())
	if cfg.Web.Dev {
		s.devSecret = opts.Secret
	}
	var db *badger.DB
	// Events come before the store, which tells them of delivered
	// messages.
	s.events, err = events.New(events.Options{
		URL: cfg.Events.Webhook, Secret: []byte(cfg.Events.Secret), Node: cfg.Cluster.Node,
		QueueSize: cfg.Events.QueueSize, MaxAttempts: cfg.Events.MaxAttempts,
		Logger: log.With("component", "events"), Now: now,
	})
	if err != nil {
		verifier.Close()
		return nil, err
	}
	deleted := msgpath.DeliveredEvents(s.events)
	if cfg.Cluster.Enabled {
		s.cluster, s.queue, err = startCluster(cfg, log, now, s.metrics.Committed, deleted)
		if err != nil {
			s.events.Close()
			verifier.Close()
			return nil, err
		}
		db = s.cluster.local
	} else {
		bq, err := badgerq.Open(badgerq.Options{
			Dir:          filepath.Join(cfg.DataDir, queueDir),
			Settings:     queueSettings(cfg.Queue),
			Sync:         badgerSync(cfg.Queue.Sync),
			SyncInterval: cfg.Queue.SyncInterval,
			MinFreeBytes: cfg.Queue.MinFreeBytes,
			Logger:       log,
			OnCommit:     s.metrics.Committed,
			OnDeleted:    deleted,
			Now:          now,
		})
		if err != nil {
			s.events.Close()
			verifier.Close()
			return nil, err
		}
		s.queue, db = bq, bq.DB()
	}
	if err := s.build(cfg, db); err != nil {
		if s.push != nil {
			s.push.Close()
		}
		if s.path != nil {
			s.path.Close()
		}
		err = errors.Join(err, s.closeStore())
		s.events.Close()
		verifier.Close()
		return nil, err
	}
	return s, nil
}

// build makes the parts of New above the store.
func (s *Server) build(cfg config.Config, db *badger.DB) error {
	var err error
	log := s.log
	groupOpts := []groups.Option{groups.MaxPerUser(cfg.Groups.MaxPerUser), groups.CacheMembers(cfg.Groups.CacheMembers)}
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s.groups, err = groups.NewKV(ctx, s.cluster.node.JetStream(), clusterPrefix+"_groups", cfg.Cluster.Replicas, cfg.Groups.MaxMembers, groupOpts...)
		cancel()
		if err != nil {
			return fmt.Errorf("cluster groups: %w", err)
		}
	} else {
		s.groups = groups.New(db, cfg.Groups.MaxMembers, groupOpts...)
	}
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s.keys, err = apikeys.NewKV(ctx, s.cluster.node.JetStream(), APIKeysBucket, cfg.Cluster.Replicas)
		cancel()
		if err != nil {
			return fmt.Errorf("cluster API keys: %w", err)
		}
	} else {
		s.keys = apikeys.NewFile(filepath.Join(cfg.DataDir, apikeys.FileName))
	}
	if s.apiDoc, err = apidoc.Handler(); err != nil {
		return err
	}
	s.push, err = push.New(push.Options{
		URL:         cfg.Push.Webhook,
		Interval:    cfg.Push.Interval,
		QueueSize:   cfg.Push.QueueSize,
		MaxAttempts: cfg.Push.MaxAttempts,
		Logger:      log.With("component", "push"),
	})
	if err != nil {
		return fmt.Errorf("push.webhook: %w", err)
	}
	var beforeSend msgpath.BeforeSend
	if cfg.Events.BeforeSend != "" {
		bs, err := beforesend.New(beforesend.Options{
			URL: cfg.Events.BeforeSend, Secret: []byte(cfg.Events.Secret), Timeout: cfg.Events.BeforeSendTimeout,
			FailOpen: cfg.Events.BeforeSendFailOpen, Logger: log.With("component", "before-send"), Now: s.now,
		})
		if err != nil {
			return fmt.Errorf("events.before_send: %w", err)
		}
		beforeSend = bs
	}
	s.mqtt = newMQTT(cfg, log)
	// A ban ends the user's connections on every node: here at once, on
	// the peers as the ban reaches their copy of the bucket.
	endBanned := func(user string) { connections{mqtt: s.mqtt}.endModeratedHere(user, "", true) }
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s.bans, err = bans.NewKV(ctx, s.cluster.node.JetStream(), clusterPrefix+"_bans", cfg.Cluster.Replicas, s.now, endBanned, log.With("component", "bans"))
		cancel()
	} else {
		s.bans, err = bans.NewBadger(db, s.now, endBanned)
	}
	if err != nil {
		return fmt.Errorf("bans: %w", err)
	}
	var relay presence.Relay
	var peers msgpath.Peers
	if s.cluster != nil {
		relay, peers = s.cluster.bus.Presence, s.cluster.bus
	}
	if s.botList, err = bots.Parse(cfg.Bots.Webhooks); err != nil {
		return fmt.Errorf("bots: %w", err)
	}
	var readers msgpath.Readers
	if s.bell = bots.NewBell(s.botList); s.bell != nil {
		readers = s.bell
	}
	s.presence = presence.New(db, s.mqtt.Publish, relay, log)
	s.path, err = msgpath.New(msgpath.Options{
		Store:           s.queue,
		Groups:          s.groups,
		Presence:        s.presence,
		Push:            s.push,
		Events:          s.events,
		BeforeSend:      beforeSend,
		Peers:           peers,
		Readers:         readers,
		Observe:         s.metrics,
		Receipts:        cfg.Receipts.Delivered,
		Copies:          cfg.Carbons.Enabled,
		MaxMessageBytes: cfg.Limits.MaxMessageBytes,
		MaxInflight:     cfg.Limits.MaxInflight,
		MaxPendingBytes: cfg.Limits.MaxPendingBytes,
		Now:             s.now,
		Log:             log,
	})
	if err != nil {
		return err
	}
	s.connects = rate.NewLimiter(rate.Limit(cfg.Limits.ConnectRate), max(1, int(2*cfg.Limits.ConnectRate)))
	s.users = &hooks.Users{
		MaxConnections:   cfg.Limits.MaxConnectionsPerUser,
		PublishRate:      cfg.Limits.PublishRate,
		PublishBytesRate: cfg.Limits.PublishBytesRate,
		MaxDelay:         cfg.Limits.PublishMaxDelay,
	}
	s.auth = &hooks.Auth{
		Server:           s.mqtt,
		Verifier:         s.verifier,
		MaxKeepalive:     uint16(min(cfg.Limits.MaxKeepalive, 65535)),
		MaxSubscriptions: cfg.Limits.MaxSubscriptions,
		Connects:         s.connects,
		Users:            s.users,
		MayAttach:        s.queue.MayAttach,
		Banned: func(user string) (string, bool) {
			b, ok := s.bans.Banned(user)
			return b.Reason, ok
		},
		Log: log,
	}
	// Revocations end the sessions they revoke through the Auth hook,
	// which asks them at every CONNECT: the hook is made first, and is
	// given the store before the server serves.
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s.revocations, err = revocations.NewKV(ctx, s.cluster.node.JetStream(), RevocationsBucket, cfg.Cluster.Replicas, s.now, s.endRevoked, log.With("component", "revocations"))
		cancel()
	} else {
		s.revocations, err = revocations.NewBadger(db, s.now, s.endRevoked, log.With("component", "revocations"))
	}
	if err != nil {
		return fmt.Errorf("revocations: %w", err)
	}
	s.auth.Revoked = s.revoked
	s.inbox = &hooks.Inbox{Server: s.mqtt, Path: s.path, Users: s.users, Observe: s.metrics, Log: log, Now: s.now}
	for _, h := range []mqtt.Hook{s.auth, s.inbox, &hooks.Presence{Retained: s.presence, Log: log}} {
		if err := s.mqtt.AddHook(h, nil); err != nil {
			return fmt.Errorf("add hook %s: %w", h.ID(), err)
		}
	}
	s.metrics.Watch(metrics.Sources{
		// mochi updates its counters atomically; so must they be read.
		Connections: func() float64 { return float64(atomic.LoadInt64(&s.mqtt.Info.ClientsConnected)) },
		Queue:       s.queue,
		Delivery:    s.path,
		Webhooks: map[string]func() webhook.Stats{
			"push":   func() webhook.Stats { return s.push.Stats().Stats },
			"events": s.events.Stats,
			"bots":   s.botStats,
		},
		ClusterQuorum: s.quorumMetric(),
	})
	mediaStore, err := s.openMedia(cfg)
	if err != nil {
		return fmt.Errorf("media: %w", err)
	}
	s.media = &media.Handler{
		Store:        mediaStore,
		Authenticate: s.bearer,
		MaxBytes:     cfg.Media.MaxBytes,
		TTL:          cfg.Media.TTL,
		Now:          s.now,
		Logger:       log.With("component", "media"),
	}
	if cfg.Media.Dir == "" && s.cluster == nil {
		// Uploads share the queue's file system and its reserve.
		s.media.DiskLow = s.queue.LowDisk
	}
	return s.addListeners()
}

// newMQTT makes the mochi server with chatd's capabilities.
func newMQTT(cfg config.Config, log *slog.Logger) *mqtt.Server {
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumQos = 1
	caps.MaximumPacketSize = uint32(cfg.Limits.MaxMessageBytes + 8192)
	// mochi's own outbound queue only carries its rare control packets;
	// deliveries and PUBACKs go through broker/msgpath/wire.
	caps.MaximumClientWritesPending = 64
	if cfg.Limits.MaxConnections > 0 {
		caps.MaximumClients = int64(cfg.Limits.MaxConnections)
	}
	// Topic aliases would let one client hold up to 65,535 topic names in
	// memory; chatd's topics are short.
	caps.TopicAliasMaximum = 0
	// chatd writes its deliveries and presence states itself, without
	// the subscription identifiers MQTT 5 would then require in them.
	caps.SubIDAvailable = 0
	caps.ReceiveMaximum = 1024
	caps.MaximumInflight = 1024
	caps.MaximumSessionExpiryInterval = uint32(cfg.Queue.DeviceTTL / time.Second)
	return mqtt.New(&mqtt.Options{
		// The inline client publishes presence changes as the server.
		InlineClient:             true,
		Capabilities:             caps,
		ClientNetWriteBufferSize: 1024,
		ClientNetReadBufferSize:  1024,
		// Nobody may subscribe to $SYS (topic.MaySubscribe), so mochi's
		// statistics topics are published once a day, not every second.
		SysTopicResendInterval: 24 * 3600,
		Logger:                 slog.New(mochi.QuietPackets{Handler: log.Handler()}).With("component", "mqtt"),
	})
}

// guard wraps l with the CONNECT deadline and panic recovery, and tells
// the Auth hook when mochi is done with each connection.
func (s *Server) guard(l listeners.Listener) listeners.Listener {
	return mochi.Guard{
		Listener: l,
		Timeout:  s.cfg.Limits.ConnectTimeout,
		OnPanic: func(c net.Conn, p any) {
			s.log.Error("connection closed after a panic; the server goes on", "remote", c.RemoteAddr().String(), "panic", fmt.Sprint(p))
			s.inbox.Abandon(c)
		},
		Ended:        &s.ended,
		Clients:      &s.mqtt.Listeners.ClientsWg,
		OnEnd:        s.auth.Ended,
		CloseClients: mochi.DisconnectOnShutdown(s.mqtt),
	}
}

// addListeners opens the MQTT listeners: TCP always, TLS and WebSocket
// when configured. On failure it closes those it opened: mochi binds a TCP
// listener when it is added, and a failed New must not keep the port.
func (s *Server) addListeners() (err error) {
	defer func() {
		if err != nil {
			s.mqtt.Listeners.CloseAll(func(string) {})
		}
	}()
	cfg := s.cfg
	var tlsConfig *tls.Config
	if cfg.TLS.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLS.CertFile, cfg.TLS.KeyFile)
		if err != nil {
			return fmt.Errorf("tls.cert_file/tls.key_file: %w", err)
		}
		s.cert.Store(&cert)
		// The certificate is looked up per handshake so that Reload can
		// replace it without closing the listeners.
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cert.Load(), nil }}
	}
	s.tcp = listeners.NewTCP(listeners.Config{ID: "tcp", Address: cfg.Listen})
	if err := s.mqtt.AddListener(s.guard(s.tcp)); err != nil {
		return fmt.Errorf("listen mqtt on %s: %w", cfg.Listen, err)
	}
	if cfg.TLS.Listen != "" {
		s.tls = listeners.NewTCP(listeners.Config{ID: "tls", Address: cfg.TLS.Listen, TLSConfig: tlsConfig})
		if err := s.mqtt.AddListener(s.guard(s.tls)); err != nil {
			return fmt.Errorf("listen mqtt over tls on %s: %w", cfg.TLS.Listen, err)
		}
	}
	if cfg.WebSocket.Listen != "" {
		var wsTLS *tls.Config
		if cfg.WebSocket.TLS {
			wsTLS = tlsConfig
		}
		s.ws = mochi.NewWebSocket("ws", cfg.WebSocket.Listen, wsTLS)
		if err := s.mqtt.AddListener(s.guard(s.ws)); err != nil {
			return fmt.Errorf("listen mqtt over websocket on %s: %w", cfg.WebSocket.Listen, err)
		}
	}
	return nil
}

// Start starts serving MQTT and HTTP.
func (s *Server) Start() error {
	s.started = s.now()
	if err := s.presence.Restore(); err != nil {
		return err
	}
	if s.cluster != nil {
		if err := s.joinCluster(); err != nil {
			return err
		}
	}
	if err := s.startBots(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.stopJanitor, s.janitorDone = cancel, make(chan struct{})
	go func() {
		defer close(s.janitorDone)
		s.media.RunJanitor(ctx, mediaJanitorEvery)
	}()
	if s.cfg.HTTP != "" {
		ln, err := net.Listen("tcp", s.cfg.HTTP)
		if err != nil {
			return fmt.Errorf("listen http on %s: %w", s.cfg.HTTP, err)
		}
		s.httpLn = ln
		// No read or write timeout: media uploads and downloads may be long.
		s.http = &http.Server{Handler: s.routes(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
		go func() {
			if err := s.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("http server", "error", err)
			}
		}()
	}
	if err := s.mqtt.Serve(); err != nil {
		return fmt.Errorf("serve mqtt: %w", err)
	}
	return nil
}

// startBots starts the consumers of the bots' queues; in a cluster, one
// node at a time consumes each bot's queue, under a lease.
func (s *Server) startBots() error {
	list := s.botList
	if len(list) == 0 {
		return nil
	}
	var lease bots.Lease
	var err error
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		lease, err = natsnode.OpenLeases(ctx, s.cluster.node.JetStream(), LeasesBucket, s.cfg.Cluster.Replicas,
			s.cfg.Cluster.Node, leaseTTL, s.log.With("component", "leases"))
		if err != nil {
			return fmt.Errorf("bots: %w", err)
		}
	}
	names := make([]string, len(list))
	for i, b := range list {
		names[i] = b.User
	}
	s.log.Info("bots served by webhooks", "bots", names)
	s.bots, err = bots.Start(bots.Options{
		Bots: list, Queue: s.queue, Secret: []byte(s.cfg.Events.Secret), Delivered: s.path.Delivered,
		Node: s.cfg.Cluster.Node, Lease: lease, Bell: s.bell, Now: s.now, Logger: s.log.With("component", "bots"),
	})
	return err
}

// botStats are the bots' webhook counters (zero before Start).
func (s *Server) botStats() webhook.Stats {
	if s.bots == nil {
		return webhook.Stats{}
	}
	return s.bots.Stats()
}

// MQTTAddr returns the MQTT listener's address.
func (s *Server) MQTTAddr() string { return s.tcp.Address() }

// TLSAddr returns the MQTT-over-TLS listener's address, "" when disabled.
func (s *Server) TLSAddr() string {
	if s.tls == nil {
		return ""
	}
	return s.tls.Address()
}

// info describes the node for the server API.
func (s *Server) info() serverapi.Info {
	return serverapi.Info{
		Version:     Version(),
		Node:        s.cfg.Cluster.Node,
		Cluster:     s.cluster != nil,
		Started:     s.started.Unix(),
		Connections: s.mqtt.Clients.Len(),
	}
}

// WebSocketAddr returns the WebSocket listener's address, "" when disabled.
func (s *Server) WebSocketAddr() string {
	if s.ws == nil {
		return ""
	}
	return s.ws.Address()
}

// HTTPAddr returns the HTTP listener's address, "" when disabled.
func (s *Server) HTTPAddr() string {
	if s.httpLn == nil {
		return ""
	}
	return s.httpLn.Addr().String()
}

// Close stops accepting connections, disconnects clients, lets the
// committer finish what was accepted, and closes the queue. Calls after
// the first return the first's result.
func (s *Server) Close(ctx context.Context) error {
	s.closed.Do(func() { s.closeErr = s.close(ctx) })
	return s.closeErr
}

func (s *Server) close(ctx context.Context) error {
	s.stopping.Store(true)
	var errs []error
	if s.http != nil {
		if err := s.http.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stop http: %w", err))
		}
	}
	s.inbox.Closing()
	s.ended.Shut()
	if err := s.mqtt.Close(); err != nil {
		errs = append(errs, fmt.Errorf("stop mqtt: %w", err))
	}
	// Client goroutines run their disconnect hooks after Close returns;
	// they may still append, so the queue stays open until they are done.
	done := make(chan struct{})
	go func() {
		s.mqtt.Listeners.ClientsWg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		errs = append(errs, fmt.Errorf("wait for clients: %w", ctx.Err()))
	}
	if s.stopJanitor != nil {
		s.stopJanitor()
		<-s.janitorDone
	}
	s.push.Close()
	if s.bots != nil {
		// Their receipts are queued before the store closes.
		s.bots.Close()
	}
	// Delivery stops, and the receipts it handed over are queued, before
	// the store finishes what it accepted and closes.
	s.path.Close()
	if err := s.closeStore(); err != nil {
		errs = append(errs, err)
	}
	// The store's last commits emitted their events: now they may go.
	s.events.Close()
	s.verifier.Close()
	return errors.Join(errs...)
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(w, "ok")
	})
	(&groups.Handler{Store: s.groups, Authenticate: s.bearer, Log: s.log}).Register(mux)
	s.media.Register(mux)
	(&serverapi.Handler{Keys: s.keys, Sender: s.path, Bans: s.bans, Conns: s.conns(),
		Presence: s.presence, Queues: s.queue, Groups: s.groups, Media: s.media.Store, Info: s.info, Now: s.now,
		Revocations: s.revocations, Tokens: s.verifier, MaxTokenAge: s.cfg.Auth.MaxTokenAge,
		MaxMessageBytes: s.cfg.Limits.MaxMessageBytes, Log: s.log}).Register(mux)
	(&deviceapi.Handler{Store: s.queue, Conns: s.conns(), Authenticate: s.bearer, Now: s.now, Log: s.log}).Register(mux)
	if s.cfg.Web.Enabled || s.cfg.Web.Dev {
		s.webapp().Register(mux)
	}
	mux.Handle("GET /v1/openapi.json", s.apiDoc)
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.Handle("GET /metrics", s.metrics.Handler())
	mux.HandleFunc("GET /cluster/status", s.clusterStatus)
	if s.cfg.Debug.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// webapp is the chat page's handler: its files when web.enabled, and the
// development sign-in when web.dev.
func (s *Server) webapp() *webapp.Handler {
	h := &webapp.Handler{WebSocket: s.WebSocketAddr, WebSocketTLS: s.cfg.WebSocket.TLS, Now: s.now,
		Log: s.log.With("component", "web")}
	if s.cfg.Web.Enabled {
		h.Dir = s.cfg.Web.Dir
	}
	if s.devSecret != nil {
		h.Mint = func(user string, ttl time.Duration) (string, error) { return token.Mint(s.devSecret, user, ttl) }
	}
	return h
}

// Readiness is /readyz's answer.
type Readiness struct {
	// Ready says the node should be given clients.
	Ready bool `json:"ready"`
	// Reasons says why not, one line per cause.
	Reasons []string `json:"reasons,omitempty"`
}

// readyz answers whether this node should be given clients: 200 when it
// is, 503 with the reasons when it is shutting down, refusing publishes
// for lack of disk, or (in a cluster) without a JetStream quorum or an
// answer from it. /healthz stays a liveness probe: a node that is not
// ready is still alive, and restarting it would not help.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	var reasons []string
	if s.stopping.Load() {
		reasons = append(reasons, "shutting down")
	}
	if s.queue.LowDisk() {
		reasons = append(reasons, fmt.Sprintf("disk: free space under queue.min_free_bytes (%d bytes free)", s.queue.FreeBytes()))
	}
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(r.Context(), readyzClusterTimeout)
		st, err := s.cluster.status(ctx)
		cancel()
		switch {
		case err != nil:
			reasons = append(reasons, "cluster: JetStream did not answer: "+err.Error())
		case !st.Quorum:
			reasons = append(reasons, "cluster: no JetStream quorum")
		}
	}
	code := http.StatusOK
	if len(reasons) > 0 {
		code = http.StatusServiceUnavailable
	}
	w.Header().Set("Cache-Control", "no-store")
	httpjson.Write(w, code, Readiness{Ready: len(reasons) == 0, Reasons: reasons})
}

// quorumMetric returns, in cluster mode, what chatd_cluster_quorum reads:
// whether JetStream answers with a quorum within readyzClusterTimeout.
func (s *Server) quorumMetric() func() bool {
	if s.cluster == nil {
		return nil
	}
	return func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), readyzClusterTimeout)
		defer cancel()
		st, err := s.cluster.status(ctx)
		return err == nil && st.Quorum
	}
}

// readyzClusterTimeout bounds the JetStream question of one /readyz, well
// under a probe's usual timeout.
const readyzClusterTimeout = 2 * time.Second

// clusterStatus answers ClusterStatus: 200 with quorum, 503 without it,
// so that a probe may use it; 404 on a node not in cluster mode. Like
// /metrics it is for operators and keeps to the HTTP listener's access.
func (s *Server) clusterStatus(w http.ResponseWriter, r *http.Request) {
	if s.cluster == nil {
		httpjson.Fail(w, http.StatusNotFound, "not_clustered", "this node is not in cluster mode")
		return
	}
	st, err := s.cluster.status(r.Context())
	if err != nil {
		s.log.Error("cluster status", "error", err)
		httpjson.Fail(w, http.StatusServiceUnavailable, "unavailable", "JetStream did not answer: "+err.Error())
		return
	}
	code := http.StatusOK
	if !st.Quorum {
		code = http.StatusServiceUnavailable
	}
	httpjson.Write(w, code, st)
}

// bearer authenticates an HTTP request by its "Authorization: Bearer" token.
func (s *Server) bearer(r *http.Request) (string, error) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return "", errors.New("missing Authorization: Bearer token")
	}
	c, err := s.verifier.Check(strings.TrimSpace(tok))
	if err != nil {
		return "", err
	}
	if s.revoked(c) {
		return "", hooks.ErrTokenRevoked
	}
	return c.User, nil
}

// revoked reports whether the token of c was revoked.
func (s *Server) revoked(c token.Claims) bool {
	_, ok := s.revocations.Revoked(c)
	return ok
}

// endRevoked ends the sessions on this node that r revokes, as r reaches
// it (the Auth hook exists before the store that calls this).
func (s *Server) endRevoked(r revocations.Revocation) { s.auth.EndRevoked(r.Matches) }

// closeStore closes the groups and the queue and, in cluster mode, NATS after them.
func (s *Server) closeStore() error {
	var err error
	if s.groups != nil {
		err = s.groups.Close()
	}
	if s.revocations != nil {
		s.revocations.Close()
	}
	if s.bans != nil {
		s.bans.Close()
	}
	err = errors.Join(err, s.queue.Close())
	if s.cluster != nil {
		err = errors.Join(err, s.cluster.close())
	}
	return err
}

// joinCluster starts listening to the node's peers: messages they store
// and typing signals feed devices here, presence counts every node's
// connections, and a client connecting elsewhere ends its session here.
func (s *Server) joinCluster() error {
	return s.cluster.join(s.log, peers.Handlers{
		Stored:         s.path.PeerStored,
		Typing:         s.path.PeerTyping,
		Presence:       s.presence.Remote,
		NodeGone:       s.presence.NodeGone,
		SessionStarted: s.takeOver,
		OnlineUsers:    s.presence.Local,
		DeviceRemoved: func(user, device string) {
			s.cluster.queue.Removed(user, device)
			s.inbox.DropSession(topic.ClientID(user, device))
			endHere(s.mqtt, topic.ClientID(user, device), hooks.ErrDeviceRemoved)
		},
		Connected: s.conns().connectedHere,
		Moderated: func(user, device string, all bool) { s.conns().endModeratedHere(user, device, all) },
		Erased: func(user string) {
			if err := s.presence.Erase(user); err != nil {
				s.log.Error("erase notice", "user", user, "error", err)
			}
			s.inbox.DropUser(user)
			s.conns().endModeratedHere(user, "", true)
		},
		// Stored notices of peers were lost: reread the queues of the
		// users with a device here, whom no later notice may wake.
		Missed: s.path.Resync,
	})
}

// takeOver ends the session of clientID here: it connected on another node.
func (s *Server) takeOver(clientID string) {
	// The session moves to the other node: what this one kept of it
	// would be stale when the device comes back here.
	s.inbox.DropSession(clientID)
	if cl, ok := s.mqtt.Clients.Get(clientID); ok && !cl.Closed() {
		cl.Stop(hooks.ErrTakenOver)
	}
}

// openMedia opens the media store: files in media.dir on one node, a
// replicated JetStream object store in a cluster, so that any node serves
// any upload.
func (s *Server) openMedia(cfg config.Config) (media.Store, error) {
	if s.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		o, err := media.NewObjects(ctx, s.cluster.node.JetStream(), clusterPrefix+"_media", cfg.Cluster.Replicas)
		if err != nil {
			return nil, err
		}
		o.Now = s.now
		return o, nil
	}
	dir := cfg.Media.Dir
	if dir == "" {
		dir = filepath.Join(cfg.DataDir, "media")
	}
	d, err := media.NewDisk(dir)
	if err != nil {
		return nil, err
	}
	d.Now = s.now
	return d, nil
}
