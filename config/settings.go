package config

import (
	"fmt"
	"reflect"
	"strings"
	"time"
)

// EnvPrefix is the prefix of every environment variable that sets a key.
const EnvPrefix = "CHATD"

// Setting describes one configuration key, for help output and documentation.
type Setting struct {
	// Key is the dotted key as written in the YAML file, e.g. queue.sync.
	Key string
	// Env is the environment variable that sets Key, e.g. CHATD_QUEUE_SYNC.
	Env string
	// Default is the built-in default value, formatted as it would be written in the file.
	Default string
	// Help says what the key does.
	Help string
}

// help documents every key; TestSettingsHelp keeps it in step with Config.
var help = map[string]string{
	"cluster.enabled":                 "run as a cluster node: queues live in NATS JetStream, replicated, and any node serves any user",
	"cluster.node":                    "this node's name, unique in the cluster and the same across restarts",
	"cluster.url":                     "join an existing NATS cluster at these comma-separated URLs instead of embedding a NATS server",
	"cluster.nats_listen":             "client address of the embedded NATS server",
	"cluster.name":                    "NATS cluster name shared by every node; empty runs a single node",
	"cluster.listen":                  "route address of the embedded NATS server, which the peers connect to",
	"cluster.routes":                  "the peers' route URLs, comma-separated, e.g. nats://10.0.0.2:6222,nats://10.0.0.3:6222",
	"cluster.replicas":                "how many nodes keep each queue (3 survives the loss of one node; 1 for tests)",
	"cluster.shards":                  "how many JetStream streams the users are spread over",
	"cluster.ack_flush_interval":      "how often acknowledgements are persisted and delivered messages deleted in cluster mode, instead of queue.ack_flush_interval: each flush is a replicated write; a crash re-delivers at most this much",
	"cluster.password":                "password (user chatd) of the embedded NATS server's clients and routes, the same on every node; required when NATS listens beyond loopback",
	"cluster.credentials":             "NATS credentials file (JWT and nkey seed) to join cluster.url with",
	"cluster.tls.cert_file":           "PEM certificate of this node for NATS: its client port, its routes (mutual TLS) and its connection to cluster.url",
	"cluster.tls.key_file":            "PEM private key of cluster.tls.cert_file",
	"cluster.tls.ca_file":             "PEM CA certificates that sign the nodes' NATS certificates (and cluster.url's)",
	"memory.limit":                    "soft limit of the Go heap in bytes (GOMEMLIMIT): past it the garbage collector runs more often instead of letting the heap grow to twice its live size; 0 takes memory.limit_ratio of the container's memory limit, or of the machine's memory; a GOMEMLIMIT environment variable wins over both",
	"memory.limit_ratio":              "share of the container's (cgroup) memory limit, or of the machine's memory without one, that memory.limit 0 takes",
	"web.enabled":                     "serve the browser chat page at / and the live dashboard at /dashboard.html on the HTTP listener (built by make web)",
	"web.dir":                         "directory of the built chat page",
	"web.dev":                         "development mode: anyone who reaches the HTTP listener may sign in as any user (POST /v1/dev/token); never in production",
	"debug.pprof":                     "serve Go profiling at /debug/pprof on the HTTP listener; keep the HTTP listener private when on",
	"data_dir":                        "directory holding the durable queue and the development secret",
	"listen":                          "MQTT TCP listen address",
	"http":                            "HTTP listen address (health, metrics, API); empty disables it",
	"tls.listen":                      "MQTT over TLS listen address, host:port; empty disables it",
	"tls.cert_file":                   "PEM certificate chain for TLS",
	"tls.key_file":                    "PEM private key for TLS",
	"websocket.listen":                "MQTT over WebSocket listen address (path /mqtt); empty disables it",
	"websocket.tls":                   "serve the WebSocket listener as wss:// with the TLS certificate",
	"auth.secret":                     "HS256 secret shared with the account service, for tokens without iss; empty uses a development secret kept in data_dir",
	"auth.issuers":                    "identity providers whose tokens are accepted, each {issuer, jwks_url | public_key_file | secret, audience, algorithms, user_claim, user_prefix} (docs/PROTOCOL.md section 6); in the environment, as a JSON list",
	"auth.leeway":                     "clock skew allowed on a token's exp, nbf and iat",
	"auth.max_token_age":              "the longest an access token lives: a revocation of a user's tokens (server API) is kept this long",
	"queue.sync":                      "when a message is made durable before its PUBACK: always (fsync every batch), batch (fsync every sync_interval), none (never fsync)",
	"queue.sync_interval":             "how often batch mode fsyncs",
	"queue.message_ttl":               "how long an undelivered message is kept",
	"queue.dedup_window":              "how long a (sender, id) pair is remembered to drop duplicates",
	"queue.max_queue_messages":        "most messages queued for one user",
	"queue.device_ttl":                "a device unseen for this long is forgotten",
	"queue.max_devices":               "most devices (client IDs) one user may have; a new one beyond it is refused at CONNECT",
	"queue.ack_flush_interval":        "how often acknowledged cursors are persisted and delivered messages deleted",
	"queue.max_batch":                 "most messages in one group commit",
	"queue.min_free_bytes":            "free bytes of data_dir's file system below which publishes and media uploads are refused, so that acknowledgements, deletes and compaction still have room",
	"limits.max_message_bytes":        "largest message object a client may send, in bytes (at most 16 MiB)",
	"limits.max_inflight":             "most unacknowledged deliveries to one device (at most 65535)",
	"limits.max_keepalive":            "largest keepalive a client may ask for, in seconds",
	"limits.max_subscriptions":        "most subscriptions of one connection (its inbox and the presence of its contacts); a SUBSCRIBE past it is refused for the extra filters",
	"limits.max_pending_bytes":        "a client whose unread outbound bytes exceed this is disconnected",
	"limits.max_connections":          "most connected clients; 0 means no cap",
	"limits.max_connections_per_user": "most simultaneous connections of one user; a session takeover does not count twice",
	"limits.connect_timeout":          "a new connection that sends no CONNECT within this is closed",
	"limits.connect_rate":             "new connections per second, server-wide (bursts of twice as many)",
	"limits.publish_rate":             "publishes per second of one user, all devices together (bursts of twice as many); over it, publishes are slowed down, then refused (publish_max_delay)",
	"limits.publish_bytes_rate":       "published bytes per second of one user (bursts of twice as many); over it, publishes are slowed down, then refused (publish_max_delay)",
	"limits.publish_max_delay":        "a publish over its user's rate waits up to this long for budget, which slows that client alone (it is read no faster); longer than this, it is refused with rate_limited; 0 refuses at once",
	"log.level":                       "debug, info, warn or error",
	"log.format":                      "text or json",
	"carbons.enabled":                 "send a user's other devices a copy of each message and read receipt one of its devices sends (PROTOCOL.md section 4)",
	"receipts.delivered":              "queue a delivered receipt to the sender when a recipient's device acknowledges a message (the second tick)",
	"groups.max_members":              "most members of one group",
	"groups.max_per_user":             "most groups one user may have made and not deleted; deleting one gives its maker the slot back",
	"groups.cache_members":            "bounds the groups kept in memory, by their members summed (a group counts one more); the least recently used make room and are read from storage again when needed",
	"media.dir":                       "directory for uploaded media; empty means media inside data_dir",
	"media.max_bytes":                 "largest upload, in bytes",
	"media.ttl":                       "uploads are deleted this long after they were made",
	"push.webhook":                    "URL that push notifications are POSTed to; empty disables push",
	"push.interval":                   "least time between two push notifications to one user",
	"push.queue_size":                 "push notifications waiting to be sent; beyond it new ones are dropped and counted",
	"push.max_attempts":               "how often one push notification is tried before it is dropped",
	"events.webhook":                  "URL that signed events (message stored, delivered and read, user connected and disconnected) are POSTed to; empty disables events",
	"events.secret":                   "HMAC-SHA256 key that signs every event (Chatd-Signature); at least 32 bytes, required with events.webhook",
	"events.queue_size":               "events waiting to be sent; beyond it new ones are dropped and counted",
	"events.max_attempts":             "how often one event is tried before it is dropped",
	"events.before_send":              "URL of a moderation service asked (signed POST) about every message before it is stored; it answers {\"allow\":bool,\"reason\":...}; empty asks nobody",
	"events.before_send_timeout":      "how long one before-send question may take; it delays only its sender",
	"events.before_send_fail_open":    "let messages go (true) or refuse them (false) when the before-send service does not answer",
	"bots.webhooks":                   "bot users, as user=URL entries separated by commas: each message to a bot is POSTed there (signed with events.secret) and deleted once the webhook answers 2xx",
}

// Settings lists every configuration key in declaration order, with its
// built-in default, environment variable and help text.
func Settings() []Setting {
	var out []Setting
	for _, l := range leaves(Default()) {
		out = append(out, Setting{
			Key:     l.key,
			Env:     EnvName(l.key),
			Default: formatValue(l.value),
			Help:    help[l.key],
		})
	}
	return out
}

// EnvName returns the environment variable that sets key.
func EnvName(key string) string {
	return EnvPrefix + "_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// leaf is one scalar setting found by walking a Config.
type leaf struct {
	key   string
	value any
}

var durationType = reflect.TypeFor[time.Duration]()

// leaves walks c by its mapstructure tags, so that the set of keys is
// defined once, by the Config struct, rather than repeated in a list here.
func leaves(c Config) []leaf {
	var out []leaf
	var walk func(v reflect.Value, prefix string)
	walk = func(v reflect.Value, prefix string) {
		t := v.Type()
		for i := range t.NumField() {
			key := prefix + t.Field(i).Tag.Get("mapstructure")
			f := v.Field(i)
			if f.Kind() == reflect.Struct && f.Type() != durationType {
				walk(f, key+".")
				continue
			}
			out = append(out, leaf{key: key, value: f.Interface()})
		}
	}
	walk(reflect.ValueOf(c), "")
	return out
}

// formatValue writes v the way a user would write it in the YAML file.
func formatValue(v any) string {
	switch v := v.(type) {
	case string:
		if v == "" {
			return `""`
		}
		return v
	case time.Duration:
		return formatDuration(v)
	default:
		return fmt.Sprint(v)
	}
}

// formatDuration drops the zero minute and second parts that
// time.Duration.String adds, so 720h prints as 720h rather than 720h0m0s.
func formatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
