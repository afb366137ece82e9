// Package config defines chatd's settings, their defaults and their validation.
package config

import (
	"fmt"
	"net"
	"time"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/bots"
)

// Sync modes say when a message is made durable relative to its PUBACK.
const (
	// SyncAlways fsyncs every commit batch before its PUBACKs are sent: survives power loss.
	SyncAlways = "always"
	// SyncBatch writes every batch to the OS before its PUBACKs and fsyncs every SyncInterval: survives a process crash, loses at most SyncInterval on power loss.
	SyncBatch = "batch"
	// SyncNone writes every batch to the OS before its PUBACKs and never fsyncs: survives a process crash only.
	SyncNone = "none"
)

// Config is the whole server configuration.
type Config struct {
	// DataDir holds the Badger queue and the development secret.
	DataDir string `mapstructure:"data_dir"`
	// Listen is the MQTT TCP listener address.
	Listen string `mapstructure:"listen"`
	// HTTP is the HTTP listener address (health, metrics, API).
	HTTP string `mapstructure:"http"`

	// TLS configures the MQTT-over-TLS listener.
	TLS TLS `mapstructure:"tls"`
	// WebSocket configures the MQTT-over-WebSocket listener.
	WebSocket WebSocket `mapstructure:"websocket"`
	// Auth holds token settings.
	Auth Auth `mapstructure:"auth"`
	// Queue holds the durable queue settings.
	Queue Queue `mapstructure:"queue"`
	// Limits holds per-client limits.
	Limits Limits `mapstructure:"limits"`
	// Log holds logging settings.
	Log Log `mapstructure:"log"`
	// Receipts holds receipt settings.
	Receipts Receipts `mapstructure:"receipts"`
	// Carbons holds the settings of copies to a user's own devices.
	Carbons Carbons `mapstructure:"carbons"`
	// Groups holds group chat settings.
	Groups Groups `mapstructure:"groups"`
	// Media holds media upload settings.
	Media Media `mapstructure:"media"`
	// Push holds push notification settings.
	Push Push `mapstructure:"push"`
	// Events holds the signed event webhook's settings.
	Events Events `mapstructure:"events"`
	// Bots holds the bot users and their webhooks.
	Bots Bots `mapstructure:"bots"`
	// Cluster configures cluster mode.
	Cluster Cluster `mapstructure:"cluster"`
	// Memory bounds the Go heap.
	Memory Memory `mapstructure:"memory"`
	// Debug holds diagnostics for operators.
	Debug Debug `mapstructure:"debug"`
	// Web holds the browser chat page and dashboard.
	Web Web `mapstructure:"web"`
}

// Web configures the browser chat page and live dashboard (web/, built
// with npm) that the HTTP listener can serve.
type Web struct {
	// Enabled serves the page at / and the dashboard at /dashboard.html.
	Enabled bool `mapstructure:"enabled"`
	// Dir is the built page's directory (make web writes web/dist).
	Dir string `mapstructure:"dir"`
	// Dev is development mode: anyone may sign in as any user (POST /v1/dev/token).
	Dev bool `mapstructure:"dev"`
}

// Memory sets the Go runtime's soft memory limit (GOMEMLIMIT), past which
// the garbage collector works harder instead of letting the heap grow to
// twice what it holds.
type Memory struct {
	// Limit is the soft limit in bytes; 0 derives it from the machine (LimitRatio).
	Limit int64 `mapstructure:"limit"`
	// LimitRatio is the share of the container's memory limit, or of the machine's memory without one, that Limit 0 takes.
	LimitRatio float64 `mapstructure:"limit_ratio"`
}

// Receipts configures the receipts the server generates.
type Receipts struct {
	// Delivered queues a delivered receipt to the sender when a recipient's device acknowledges a message.
	Delivered bool `mapstructure:"delivered"`
}

// Carbons configures the copies that keep a user's devices in step.
type Carbons struct {
	// Enabled sends a user's other devices a copy of each message and read receipt one of them sends.
	Enabled bool `mapstructure:"enabled"`
}

// Groups configures group chats.
type Groups struct {
	// MaxMembers caps a group's size.
	MaxMembers int `mapstructure:"max_members"`
	// MaxPerUser caps the groups one user has made and not deleted.
	MaxPerUser int `mapstructure:"max_per_user"`
	// CacheMembers bounds the groups kept in memory by their members, summed.
	CacheMembers int `mapstructure:"cache_members"`
}

// Media configures uploaded files.
type Media struct {
	// Dir holds uploaded files; empty means "media" inside DataDir.
	Dir string `mapstructure:"dir"`
	// MaxBytes caps one upload.
	MaxBytes int64 `mapstructure:"max_bytes"`
	// TTL deletes an upload this long after it was made.
	TTL time.Duration `mapstructure:"ttl"`
}

// Push configures the webhook that wakes sleeping phones.
type Push struct {
	// Webhook is the URL notifications are POSTed to; empty disables push.
	Webhook string `mapstructure:"webhook"`
	// Interval is the least time between two notifications to one user.
	Interval time.Duration `mapstructure:"interval"`
	// QueueSize bounds the notifications waiting to be sent.
	QueueSize int `mapstructure:"queue_size"`
	// MaxAttempts is how often one notification is tried.
	MaxAttempts int `mapstructure:"max_attempts"`
}

// Events configures the webhook that tells an app's backend what happens:
// messages stored, delivered and read, users connected and disconnected.
type Events struct {
	// Webhook is the URL events are POSTed to; empty disables events.
	Webhook string `mapstructure:"webhook"`
	// Secret signs every event (HMAC-SHA256); required with Webhook.
	Secret string `mapstructure:"secret"`
	// QueueSize bounds the events waiting to be sent.
	QueueSize int `mapstructure:"queue_size"`
	// MaxAttempts is how often one event is tried.
	MaxAttempts int `mapstructure:"max_attempts"`
	// BeforeSend is a moderation service asked about every message
	// before it is stored; empty asks nobody.
	BeforeSend string `mapstructure:"before_send"`
	// BeforeSendTimeout bounds one question to BeforeSend.
	BeforeSendTimeout time.Duration `mapstructure:"before_send_timeout"`
	// BeforeSendFailOpen lets messages go when BeforeSend does not answer.
	BeforeSendFailOpen bool `mapstructure:"before_send_fail_open"`
}

// Bots configures bot users: user IDs whose messages go to a webhook
// instead of a device.
type Bots struct {
	// Webhooks lists the bots as "user=URL" entries separated by commas.
	Webhooks string `mapstructure:"webhooks"`
}

// Cluster configures cluster mode: queues in NATS JetStream, shared by
// every node, instead of the embedded Badger store.
type Cluster struct {
	// Enabled turns cluster mode on.
	Enabled bool `mapstructure:"enabled"`
	// Node is this node's name, unique in the cluster and stable across restarts.
	Node string `mapstructure:"node"`
	// URL joins an existing NATS cluster (comma-separated URLs) instead of embedding one.
	URL string `mapstructure:"url"`
	// NATSListen is the embedded NATS server's client address.
	NATSListen string `mapstructure:"nats_listen"`
	// Name is the NATS cluster name shared by every node; empty runs one node alone.
	Name string `mapstructure:"name"`
	// Listen is the embedded NATS server's route address, which peers connect to.
	Listen string `mapstructure:"listen"`
	// Routes lists the peers' route URLs, comma-separated (nats://host:port).
	Routes string `mapstructure:"routes"`
	// Replicas is how many nodes keep each queue.
	Replicas int `mapstructure:"replicas"`
	// Shards is how many JetStream streams the users are spread over.
	Shards int `mapstructure:"shards"`
	// AckFlushInterval replaces queue.ack_flush_interval in cluster mode:
	// each flush of a user's acknowledgements is a replicated cursor write
	// and a replicated purge, too dear to run every few milliseconds.
	AckFlushInterval time.Duration `mapstructure:"ack_flush_interval"`
	// Password is asked of every client and route of the embedded NATS
	// server (user "chatd"), the same on every node; required when it
	// listens beyond loopback.
	Password string `mapstructure:"password"`
	// Credentials is a NATS credentials file (JWT and nkey seed) to join
	// cluster.url with.
	Credentials string `mapstructure:"credentials"`
	// TLS encrypts the embedded NATS server's client port and its routes
	// (mutually authenticated), and the connection to cluster.url.
	TLS ClusterTLS `mapstructure:"tls"`
}

// ClusterTLS holds the PEM files of cluster mode's TLS.
type ClusterTLS struct {
	// CertFile is this node's certificate chain, for the client port and
	// routes (and as the client certificate towards cluster.url).
	CertFile string `mapstructure:"cert_file"`
	// KeyFile is its private key.
	KeyFile string `mapstructure:"key_file"`
	// CAFile holds the CAs that sign the nodes' certificates.
	CAFile string `mapstructure:"ca_file"`
}

// Enabled reports whether cluster TLS is configured.
func (t ClusterTLS) Enabled() bool { return t.CertFile != "" || t.KeyFile != "" || t.CAFile != "" }

// Debug configures diagnostics.
type Debug struct {
	// Pprof serves Go's profiler on the HTTP listener.
	Pprof bool `mapstructure:"pprof"`
}

// TLS configures MQTT over TLS.
type TLS struct {
	// Listen is the TLS listener address; empty disables it.
	Listen string `mapstructure:"listen"`
	// CertFile is the PEM certificate chain.
	CertFile string `mapstructure:"cert_file"`
	// KeyFile is the PEM private key.
	KeyFile string `mapstructure:"key_file"`
}

// WebSocket configures MQTT over WebSocket, served at /mqtt.
type WebSocket struct {
	// Listen is the WebSocket listener address; empty disables it.
	Listen string `mapstructure:"listen"`
	// TLS serves wss:// with the certificate of the tls section.
	TLS bool `mapstructure:"tls"`
}

// Auth configures access tokens.
type Auth struct {
	// Secret is the HS256 key shared with the account service; empty means the development secret in DataDir.
	Secret string `mapstructure:"secret"`
	// Issuers are the identity providers whose tokens are accepted too,
	// each with its own keys.
	Issuers []token.Issuer `mapstructure:"issuers"`
	// Leeway is the clock skew allowed on a token's exp, nbf and iat.
	Leeway time.Duration `mapstructure:"leeway"`
	// MaxTokenAge is the longest a token lives: a revocation of a user's
	// tokens is kept this long.
	MaxTokenAge time.Duration `mapstructure:"max_token_age"`
}

// Queue configures the durable per-user queues.
type Queue struct {
	// Sync is one of always, batch, none.
	Sync string `mapstructure:"sync"`
	// SyncInterval is how often batch mode fsyncs.
	SyncInterval time.Duration `mapstructure:"sync_interval"`
	// MessageTTL is how long an undelivered message is kept.
	MessageTTL time.Duration `mapstructure:"message_ttl"`
	// DedupWindow is how long a (sender, id) pair is remembered.
	DedupWindow time.Duration `mapstructure:"dedup_window"`
	// MaxQueueMessages caps one user's queue.
	MaxQueueMessages int `mapstructure:"max_queue_messages"`
	// DeviceTTL forgets a device unseen for this long.
	DeviceTTL time.Duration `mapstructure:"device_ttl"`
	// MaxDevices caps one user's known devices.
	MaxDevices int `mapstructure:"max_devices"`
	// AckFlushInterval is how often acknowledged cursors are persisted and delivered messages deleted.
	AckFlushInterval time.Duration `mapstructure:"ack_flush_interval"`
	// MaxBatch caps the number of messages in one group commit.
	MaxBatch int `mapstructure:"max_batch"`
	// MinFreeBytes is the free space of data_dir's file system below which publishes are refused.
	MinFreeBytes int64 `mapstructure:"min_free_bytes"`
}

// Limits configures what one client may do.
type Limits struct {
	// MaxMessageBytes caps a message object's size.
	MaxMessageBytes int `mapstructure:"max_message_bytes"`
	// MaxInflight caps unacknowledged deliveries to one device.
	MaxInflight int `mapstructure:"max_inflight"`
	// MaxKeepalive caps the keepalive a client may ask for, in seconds.
	MaxKeepalive int `mapstructure:"max_keepalive"`
	// MaxSubscriptions caps one connection's subscriptions (its inbox and the presence of its contacts).
	MaxSubscriptions int `mapstructure:"max_subscriptions"`
	// MaxPendingBytes disconnects a client whose unread outbound bytes exceed it.
	MaxPendingBytes int `mapstructure:"max_pending_bytes"`
	// MaxConnections caps connected clients; 0 means no cap.
	MaxConnections int `mapstructure:"max_connections"`
	// MaxConnectionsPerUser caps one user's simultaneous connections.
	MaxConnectionsPerUser int `mapstructure:"max_connections_per_user"`
	// ConnectTimeout is how long a new connection may take to send CONNECT.
	ConnectTimeout time.Duration `mapstructure:"connect_timeout"`
	// ConnectRate caps new connections per second, server-wide.
	ConnectRate float64 `mapstructure:"connect_rate"`
	// PublishRate caps one user's publishes per second (bursts of twice as many).
	PublishRate float64 `mapstructure:"publish_rate"`
	// PublishBytesRate caps one user's published bytes per second (bursts of twice as many).
	PublishBytesRate int `mapstructure:"publish_bytes_rate"`
	// PublishMaxDelay is how long a publish over its sender's rate may wait before it is refused.
	PublishMaxDelay time.Duration `mapstructure:"publish_max_delay"`
}

// Log configures logging.
type Log struct {
	// Level is one of debug, info, warn, error.
	Level string `mapstructure:"level"`
	// Format is text or json.
	Format string `mapstructure:"format"`
}

// MinSecretBytes is the shortest auth.secret accepted: HS256 wants a key
// of at least its 32-byte output.
const MinSecretBytes = 32

// Default returns the embedded default configuration used by `make run`.
func Default() Config {
	// The queue's own defaults are the queue package's, which its
	// backends also fall back on.
	q := queue.DefaultSettings()
	return Config{
		DataDir: "data",
		Listen:  "127.0.0.1:1883",
		HTTP:    "127.0.0.1:8080",
		Queue: Queue{
			Sync:             SyncBatch,
			SyncInterval:     100 * time.Millisecond,
			MessageTTL:       q.MessageTTL,
			DedupWindow:      q.DedupWindow,
			MaxQueueMessages: q.MaxQueueMessages,
			DeviceTTL:        q.DeviceTTL,
			MaxDevices:       q.MaxDevices,
			AckFlushInterval: q.AckFlushInterval,
			MaxBatch:         q.MaxBatch,
			MinFreeBytes:     256 << 20,
		},
		Limits: Limits{
			MaxMessageBytes:       64 * 1024,
			MaxInflight:           64,
			MaxKeepalive:          600,
			MaxSubscriptions:      4096,
			MaxPendingBytes:       8 << 20,
			MaxConnectionsPerUser: 16,
			ConnectTimeout:        10 * time.Second,
			ConnectRate:           2000,
			PublishRate:           1000,
			PublishBytesRate:      8 << 20,
			PublishMaxDelay:       time.Second,
		},
		Web:      Web{Dir: "web/dist"},
		Auth:     Auth{Leeway: 10 * time.Second, MaxTokenAge: 30 * 24 * time.Hour},
		Log:      Log{Level: "info", Format: "text"},
		Receipts: Receipts{Delivered: true},
		Carbons:  Carbons{Enabled: true},
		Groups:   Groups{MaxMembers: 1024, MaxPerUser: 1000, CacheMembers: 1_000_000},
		Media:    Media{MaxBytes: 64 << 20, TTL: 30 * 24 * time.Hour},
		Push:     Push{Interval: 30 * time.Second, QueueSize: 10000, MaxAttempts: 5},
		Events:   Events{QueueSize: 10000, MaxAttempts: 8, BeforeSendTimeout: 2 * time.Second, BeforeSendFailOpen: true},
		Cluster:  Cluster{NATSListen: "127.0.0.1:4222", Replicas: 3, Shards: 4, AckFlushInterval: 500 * time.Millisecond},
		Memory:   Memory{LimitRatio: 0.9},
	}
}

// validateSecurity refuses an embedded NATS reachable beyond loopback
// without a password: whoever reaches its ports would own every queue.
func (c Cluster) validateSecurity() error {
	if n := len(c.Password); n > 0 && n < MinSecretBytes {
		return fmt.Errorf("cluster.password: must be at least %d bytes, got %d (make one with: openssl rand -hex 32)", MinSecretBytes, n)
	}
	t := c.TLS
	if t.Enabled() && (t.CertFile == "" || t.KeyFile == "" || t.CAFile == "") && c.URL == "" {
		return fmt.Errorf("cluster.tls: cert_file, key_file and ca_file are all needed: routes authenticate each other with certificates the CA signs")
	}
	if t.Enabled() && (t.CertFile == "") != (t.KeyFile == "") {
		return fmt.Errorf("cluster.tls: cert_file and key_file go together")
	}
	if c.URL != "" || c.Password != "" {
		return nil
	}
	listens := []struct{ key, addr string }{{"cluster.nats_listen", c.NATSListen}}
	if c.Name != "" {
		routes := c.Listen
		if routes == "" {
			// The route port binds the client port's host then.
			routes = c.NATSListen
		}
		listens = append(listens, struct{ key, addr string }{"cluster.listen", routes})
	}
	for _, l := range listens {
		if !loopback(l.addr) {
			return fmt.Errorf("%s %q is reachable beyond this machine, and anyone who reaches a NATS port owns every queue: set cluster.password (the same on every node; make one with: openssl rand -hex 32), and cluster.tls to encrypt, or listen on 127.0.0.1", l.key, l.addr)
		}
	}
	return nil
}

// loopback reports whether a NATS listen address host:port binds
// loopback only. An empty host (or address) binds 127.0.0.1, as the
// embedded server is started (natsnode), not every interface.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "" || host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Validate reports the first invalid setting, naming its key.
func (c *Config) Validate() error {
	switch {
	case c.DataDir == "":
		return fmt.Errorf("data_dir: must not be empty")
	case c.Listen == "":
		return fmt.Errorf("listen: must not be empty")
	}
	if c.TLS.Listen != "" && (c.TLS.CertFile == "" || c.TLS.KeyFile == "") {
		return fmt.Errorf("tls.listen: needs tls.cert_file and tls.key_file")
	}
	if (c.Web.Enabled || c.Web.Dev) && c.HTTP == "" {
		return fmt.Errorf("web: the chat page and development sign-in need the http listener")
	}
	if c.Web.Enabled && c.Web.Dir == "" {
		return fmt.Errorf("web.dir: must name the built page's directory when web.enabled")
	}
	if c.WebSocket.TLS && (c.TLS.CertFile == "" || c.TLS.KeyFile == "") {
		return fmt.Errorf("websocket.tls: needs tls.cert_file and tls.key_file")
	}
	switch c.Queue.Sync {
	case SyncAlways, SyncBatch, SyncNone:
	default:
		return fmt.Errorf("queue.sync: %q is not one of always, batch, none", c.Queue.Sync)
	}
	positive := []struct {
		key string
		v   int64
	}{
		{"queue.sync_interval", int64(c.Queue.SyncInterval)},
		{"queue.message_ttl", int64(c.Queue.MessageTTL)},
		{"queue.dedup_window", int64(c.Queue.DedupWindow)},
		{"queue.max_queue_messages", int64(c.Queue.MaxQueueMessages)},
		{"queue.device_ttl", int64(c.Queue.DeviceTTL)},
		{"queue.max_devices", int64(c.Queue.MaxDevices)},
		{"queue.ack_flush_interval", int64(c.Queue.AckFlushInterval)},
		{"cluster.ack_flush_interval", int64(c.Cluster.AckFlushInterval)},
		{"queue.max_batch", int64(c.Queue.MaxBatch)},
		{"queue.min_free_bytes", c.Queue.MinFreeBytes},
		{"limits.max_message_bytes", int64(c.Limits.MaxMessageBytes)},
		{"limits.max_inflight", int64(c.Limits.MaxInflight)},
		{"limits.max_keepalive", int64(c.Limits.MaxKeepalive)},
		{"limits.max_subscriptions", int64(c.Limits.MaxSubscriptions)},
		{"limits.max_pending_bytes", int64(c.Limits.MaxPendingBytes)},
		{"limits.max_connections_per_user", int64(c.Limits.MaxConnectionsPerUser)},
		{"limits.connect_rate", int64(c.Limits.ConnectRate)},
		{"limits.connect_timeout", int64(c.Limits.ConnectTimeout)},
		{"limits.publish_bytes_rate", int64(c.Limits.PublishBytesRate)},
		{"groups.max_members", int64(c.Groups.MaxMembers)},
		{"groups.max_per_user", int64(c.Groups.MaxPerUser)},
		{"groups.cache_members", int64(c.Groups.CacheMembers)},
		{"media.max_bytes", c.Media.MaxBytes},
		{"media.ttl", int64(c.Media.TTL)},
		{"push.interval", int64(c.Push.Interval)},
		{"push.queue_size", int64(c.Push.QueueSize)},
		{"push.max_attempts", int64(c.Push.MaxAttempts)},
		{"events.queue_size", int64(c.Events.QueueSize)},
		{"events.max_attempts", int64(c.Events.MaxAttempts)},
		{"events.before_send_timeout", int64(c.Events.BeforeSendTimeout)},
	}
	for _, p := range positive {
		if p.v <= 0 {
			return fmt.Errorf("%s: must be positive, got %d", p.key, p.v)
		}
	}
	if n := len(c.Auth.Secret); n > 0 && n < MinSecretBytes {
		return fmt.Errorf("auth.secret: must be at least %d bytes, got %d: a short secret lets a captured token be brute-forced offline (make one with: openssl rand -hex 32)", MinSecretBytes, n)
	}
	if (c.Events.Webhook != "" || c.Events.BeforeSend != "") && len(c.Events.Secret) < MinSecretBytes {
		return fmt.Errorf("events.secret: events.webhook and events.before_send need a secret of at least %d bytes to sign requests with, got %d (make one with: openssl rand -hex 32)", MinSecretBytes, len(c.Events.Secret))
	}
	seen := map[string]bool{}
	for i, is := range c.Auth.Issuers {
		if err := is.Validate(); err != nil {
			return fmt.Errorf("auth.issuers[%d]: %w", i, err)
		}
		if seen[is.Issuer] {
			return fmt.Errorf("auth.issuers[%d]: issuer %s named twice", i, is.Issuer)
		}
		seen[is.Issuer] = true
	}
	if c.Auth.MaxTokenAge < time.Minute {
		return fmt.Errorf("auth.max_token_age: at least 1m, got %v", c.Auth.MaxTokenAge)
	}
	if c.Auth.Leeway < 0 || c.Auth.Leeway > 5*time.Minute {
		return fmt.Errorf("auth.leeway: 0 to 5m, got %v", c.Auth.Leeway)
	}
	for _, u := range []struct{ key, value string }{
		{"push.webhook", c.Push.Webhook}, {"events.webhook", c.Events.Webhook}, {"events.before_send", c.Events.BeforeSend},
	} {
		if err := checkURL(u.key, u.value); err != nil {
			return err
		}
	}
	if _, err := bots.Parse(c.Bots.Webhooks); err != nil {
		return fmt.Errorf("bots.webhooks: %w", err)
	}
	if c.Bots.Webhooks != "" && len(c.Events.Secret) < MinSecretBytes {
		return fmt.Errorf("events.secret: bots.webhooks needs a secret of at least %d bytes to sign requests with, got %d (make one with: openssl rand -hex 32)", MinSecretBytes, len(c.Events.Secret))
	}
	if !(c.Limits.PublishRate > 0) {
		return fmt.Errorf("limits.publish_rate: must be positive, got %g", c.Limits.PublishRate)
	}
	if c.Cluster.Enabled {
		switch {
		case c.Cluster.Node == "":
			return fmt.Errorf("cluster.node: a cluster node needs a name, unique in its cluster")
		case c.Cluster.Replicas < 1 || c.Cluster.Replicas > 5:
			return fmt.Errorf("cluster.replicas: must be 1 to 5, got %d", c.Cluster.Replicas)
		case c.Cluster.Shards < 1:
			return fmt.Errorf("cluster.shards: must be positive, got %d", c.Cluster.Shards)
		case c.Cluster.Replicas > 1 && c.Cluster.URL == "" && c.Cluster.Name == "":
			return fmt.Errorf("cluster.replicas: %d copies need peers: set cluster.name and cluster.routes, or cluster.url, or replicas 1 for a node alone", c.Cluster.Replicas)
		}
		if err := c.Cluster.validateSecurity(); err != nil {
			return err
		}
	}
	if c.Memory.Limit < 0 {
		return fmt.Errorf("memory.limit: must not be negative, got %d", c.Memory.Limit)
	}
	if !(c.Memory.LimitRatio > 0 && c.Memory.LimitRatio <= 1) {
		return fmt.Errorf("memory.limit_ratio: must be above 0 and at most 1, got %g", c.Memory.LimitRatio)
	}
	if c.Limits.PublishMaxDelay < 0 {
		return fmt.Errorf("limits.publish_max_delay: must not be negative, got %s", c.Limits.PublishMaxDelay)
	}
	if c.Limits.MaxConnections < 0 {
		return fmt.Errorf("limits.max_connections: must not be negative, got %d", c.Limits.MaxConnections)
	}
	if c.Limits.MaxInflight > 65535 {
		return fmt.Errorf("limits.max_inflight: at most 65535, got %d", c.Limits.MaxInflight)
	}
	if c.Limits.MaxMessageBytes > 16<<20 {
		return fmt.Errorf("limits.max_message_bytes: at most 16 MiB, got %d", c.Limits.MaxMessageBytes)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log.level: %q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return fmt.Errorf("log.format: %q is not one of text, json", c.Log.Format)
	}
	return nil
}
