package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/spf13/pflag"
)

// clearEnv blanks every CHATD_* variable for the test; viper ignores empty
// variables, so the test does not depend on the caller's environment.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, s := range Settings() {
		t.Setenv(s.Env, "")
	}
}

func TestLoad(t *testing.T) {
	tests := []struct {
		name string
		// files are created in the working directory before loading.
		files map[string]string
		// yaml, when not empty, is written to chatd.yaml and passed to Load.
		yaml    string
		env     map[string]string
		args    []string
		want    func(c *Config)
		wantErr []string
	}{
		{
			name: "defaults",
			want: func(*Config) {},
		},
		{
			name: "file overrides default",
			yaml: `
listen: 0.0.0.0:1884
auth:
  secret: s3cret-s3cret-s3cret-s3cret-s3cret
queue:
  sync: always
  sync_interval: 250ms
  message_ttl: 720h
limits:
  max_inflight: 10
log:
  format: json
`,
			want: func(c *Config) {
				c.Listen = "0.0.0.0:1884"
				c.Auth.Secret = "s3cret-s3cret-s3cret-s3cret-s3cret"
				c.Queue.Sync = SyncAlways
				c.Queue.SyncInterval = 250 * time.Millisecond
				c.Queue.MessageTTL = 720 * time.Hour
				c.Limits.MaxInflight = 10
				c.Log.Format = "json"
			},
		},
		{
			name: "env overrides file",
			yaml: "listen: 0.0.0.0:1884\nqueue:\n  sync: always\nlimits:\n  max_inflight: 10\n",
			env: map[string]string{
				"CHATD_LISTEN":              "0.0.0.0:1885",
				"CHATD_QUEUE_SYNC":          "none",
				"CHATD_QUEUE_DEDUP_WINDOW":  "1h30m",
				"CHATD_LIMITS_MAX_INFLIGHT": "7",
				"CHATD_AUTH_SECRET":         "from-env-0123456789abcdef0123456789",
			},
			want: func(c *Config) {
				c.Listen = "0.0.0.0:1885"
				c.Queue.Sync = SyncNone
				c.Queue.DedupWindow = 90 * time.Minute
				c.Limits.MaxInflight = 7
				c.Auth.Secret = "from-env-0123456789abcdef0123456789"
			},
		},
		{
			name: "flag overrides env",
			env:  map[string]string{"CHATD_LISTEN": "0.0.0.0:1885", "CHATD_DATA_DIR": "env-data", "CHATD_HTTP": "0.0.0.0:9000"},
			args: []string{"--listen", "127.0.0.1:2883", "--data-dir", "flag-data"},
			want: func(c *Config) {
				c.Listen = "127.0.0.1:2883"
				c.DataDir = "flag-data"
				c.HTTP = "0.0.0.0:9000"
			},
		},
		{
			name: "unset flag keeps file value",
			yaml: "listen: 0.0.0.0:1884\ndata_dir: file-data\n",
			args: []string{},
			want: func(c *Config) {
				c.Listen = "0.0.0.0:1884"
				c.DataDir = "file-data"
			},
		},
		{
			name:    "unknown nested key refused",
			yaml:    "queue:\n  synk: always\n",
			wantErr: []string{"chatd.yaml", "unknown key", "queue.synk"},
		},
		{
			name:    "unknown top-level key refused",
			yaml:    "listen_addr: 0.0.0.0:1884\n",
			wantErr: []string{"unknown key", "listen_addr"},
		},
		{
			name:    "negative limit refused",
			yaml:    "limits:\n  max_inflight: -1\n",
			wantErr: []string{"chatd.yaml", "limits.max_inflight", "positive"},
		},
		{
			name:    "negative limit from env refused",
			env:     map[string]string{"CHATD_LIMITS_MAX_MESSAGE_BYTES": "-5"},
			wantErr: []string{"limits.max_message_bytes", "positive", "CHATD_LIMITS_MAX_MESSAGE_BYTES"},
		},
		{
			name: "group limits from env",
			env:  map[string]string{"CHATD_GROUPS_MAX_PER_USER": "5", "CHATD_GROUPS_CACHE_MEMBERS": "2000"},
			want: func(c *Config) {
				c.Groups.MaxPerUser = 5
				c.Groups.CacheMembers = 2000
			},
		},
		{
			name:    "zero groups per user refused",
			yaml:    "groups:\n  max_per_user: 0\n",
			wantErr: []string{"chatd.yaml", "groups.max_per_user", "positive"},
		},
		{
			name:    "negative group cache from env refused",
			env:     map[string]string{"CHATD_GROUPS_CACHE_MEMBERS": "-1"},
			wantErr: []string{"groups.cache_members", "positive", "CHATD_GROUPS_CACHE_MEMBERS"},
		},
		{
			name:    "bad sync mode",
			yaml:    "queue:\n  sync: fsync\n",
			wantErr: []string{"queue.sync", "fsync"},
		},
		{
			name:    "bad duration",
			yaml:    "queue:\n  sync_interval: 10 parsecs\n",
			wantErr: []string{"queue.sync_interval"},
		},
		{
			name:    "duration without unit",
			yaml:    "queue:\n  message_ttl: 100\n",
			wantErr: []string{"queue.message_ttl", "needs a unit"},
		},
		{
			name:    "bad duration from env",
			env:     map[string]string{"CHATD_QUEUE_DEVICE_TTL": "forever"},
			wantErr: []string{"queue.device_ttl", "forever", "CHATD_QUEUE_DEVICE_TTL"},
		},
		{
			name: "memory limit from env",
			env:  map[string]string{"CHATD_MEMORY_LIMIT": "1073741824", "CHATD_MEMORY_LIMIT_RATIO": "0.5"},
			want: func(c *Config) { c.Memory.Limit, c.Memory.LimitRatio = 1<<30, 0.5 },
		},
		{
			name:    "negative memory limit",
			yaml:    "memory:\n  limit: -1\n",
			wantErr: []string{"memory.limit", "negative"},
		},
		{
			name:    "memory ratio above one",
			yaml:    "memory:\n  limit_ratio: 1.5\n",
			wantErr: []string{"memory.limit_ratio", "at most 1"},
		},
		{
			name:    "wrong type",
			yaml:    "limits:\n  max_inflight: lots\n",
			wantErr: []string{"limits.max_inflight"},
		},
		{
			name:    "cluster without a name",
			yaml:    "cluster:\n  enabled: true\n  node: n1\n",
			wantErr: []string{"cluster.replicas", "need peers"},
		},
		{
			name:    "cluster node without a name",
			yaml:    "cluster:\n  enabled: true\n  name: prod\n",
			wantErr: []string{"cluster.node"},
		},
		{
			name: "cluster secured beyond loopback",
			yaml: "cluster:\n  enabled: true\n  node: n1\n  name: prod\n  nats_listen: 0.0.0.0:4222\n  listen: 0.0.0.0:6222\n  password: 0123456789abcdef0123456789abcdef\n  tls:\n    cert_file: n1.pem\n    key_file: n1-key.pem\n    ca_file: ca.pem\n",
			want: func(c *Config) {
				c.Cluster.Enabled, c.Cluster.Node, c.Cluster.Name = true, "n1", "prod"
				c.Cluster.NATSListen, c.Cluster.Listen = "0.0.0.0:4222", "0.0.0.0:6222"
				c.Cluster.Password = "0123456789abcdef0123456789abcdef"
				c.Cluster.TLS = ClusterTLS{CertFile: "n1.pem", KeyFile: "n1-key.pem", CAFile: "ca.pem"}
			},
		},
		{
			name:    "cluster NATS beyond loopback without a password",
			yaml:    "cluster:\n  enabled: true\n  node: n1\n  replicas: 1\n  nats_listen: 0.0.0.0:4222\n",
			wantErr: []string{"cluster.nats_listen", "0.0.0.0:4222", "set cluster.password"},
		},
		{
			name:    "cluster routes beyond loopback without a password",
			yaml:    "cluster:\n  enabled: true\n  node: n1\n  name: prod\n  listen: 10.0.0.1:6222\n",
			wantErr: []string{"cluster.listen", "10.0.0.1:6222", "set cluster.password"},
		},
		{
			name: "cluster routes on the client port's loopback host",
			yaml: "cluster:\n  enabled: true\n  node: n1\n  name: local\n",
			want: func(c *Config) { c.Cluster.Enabled, c.Cluster.Node, c.Cluster.Name = true, "n1", "local" },
		},
		{
			name:    "short cluster password",
			yaml:    "cluster:\n  enabled: true\n  node: n1\n  replicas: 1\n  password: short\n",
			wantErr: []string{"cluster.password", "at least 32 bytes"},
		},
		{
			name:    "cluster TLS without a CA",
			yaml:    "cluster:\n  enabled: true\n  node: n1\n  replicas: 1\n  tls:\n    cert_file: a.pem\n    key_file: k.pem\n",
			wantErr: []string{"cluster.tls", "ca_file"},
		},
		{
			name:    "short secret",
			yaml:    "auth:\n  secret: s3cret\n",
			wantErr: []string{"auth.secret", "at least 32 bytes", "got 6"},
		},
		{
			name:    "fraction for an integer",
			yaml:    "limits:\n  max_keepalive: 1.5\n",
			wantErr: []string{"limits.max_keepalive", "whole number"},
		},
		{
			name:    "section given a scalar",
			yaml:    "queue: fast\n",
			wantErr: []string{"queue"},
		},
		{
			name:    "malformed yaml",
			yaml:    "listen: [\n",
			wantErr: []string{"chatd.yaml"},
		},
		{
			name:    "data dir under a regular file",
			files:   map[string]string{"blocker": "not a directory"},
			yaml:    "data_dir: blocker/data\n",
			wantErr: []string{"chatd.yaml", "data_dir", "blocker/data"},
		},
		{
			name: "issuers from the file",
			yaml: `
auth:
  leeway: 30s
  issuers:
    - issuer: https://login.example.com/
      jwks_url: https://login.example.com/.well-known/jwks.json
      audience: [chat-app]
      user_prefix: ex.
`,
			want: func(c *Config) {
				c.Auth.Leeway = 30 * time.Second
				c.Auth.Issuers = []token.Issuer{{Issuer: "https://login.example.com/", JWKSURL: "https://login.example.com/.well-known/jwks.json",
					Audience: []string{"chat-app"}, UserPrefix: "ex."}}
			},
		},
		{
			name: "issuers from the environment, as JSON",
			env:  map[string]string{"CHATD_AUTH_ISSUERS": `[{"issuer":"https://a.example/","jwks_url":"https://a.example/jwks","algorithms":["RS256"]}]`},
			want: func(c *Config) {
				c.Auth.Issuers = []token.Issuer{{Issuer: "https://a.example/", JWKSURL: "https://a.example/jwks", Algorithms: []string{"RS256"}}}
			},
		},
		{
			name:    "issuer with an unknown field",
			env:     map[string]string{"CHATD_AUTH_ISSUERS": `[{"issuer":"https://a.example/","jwks":"https://a.example/jwks"}]`},
			wantErr: []string{"auth.issuers", "jwks"},
		},
		{
			name:    "issuer with a misspelt key in the file",
			yaml:    "auth:\n  issuers:\n    - issuer: a\n      jwks: https://idp.example/jwks\n",
			wantErr: []string{"chatd.yaml", "jwks"},
		},
		{
			name:    "issuer over plain http",
			yaml:    "auth:\n  issuers:\n    - issuer: a\n      jwks_url: http://idp.example/jwks\n",
			wantErr: []string{"chatd.yaml", "auth.issuers[0]", "https"},
		},
		{
			name: "bots from the environment",
			env: map[string]string{
				"CHATD_BOTS_WEBHOOKS": "echo=http://127.0.0.1:9000/,news=https://bots.example/news",
				"CHATD_EVENTS_SECRET": "0123456789abcdef0123456789abcdef",
			},
			want: func(c *Config) {
				c.Bots.Webhooks = "echo=http://127.0.0.1:9000/,news=https://bots.example/news"
				c.Events.Secret = "0123456789abcdef0123456789abcdef"
			},
		},
		{
			name:    "bots without a secret",
			env:     map[string]string{"CHATD_BOTS_WEBHOOKS": "echo=http://127.0.0.1:9000/"},
			wantErr: []string{"events.secret", "bots.webhooks"},
		},
		{
			name:    "bot without a URL",
			yaml:    "bots:\n  webhooks: echo\nevents:\n  secret: 0123456789abcdef0123456789abcdef\n",
			wantErr: []string{"chatd.yaml", "bots.webhooks", "want user=URL"},
		},
		{
			name:    "empty data dir",
			args:    []string{"--data-dir", ""},
			wantErr: []string{"data_dir", "empty", "--data-dir"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			dir := t.TempDir()
			t.Chdir(dir)
			for name, content := range tt.files {
				if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			file := ""
			if tt.yaml != "" {
				file = filepath.Join(dir, "chatd.yaml")
				if err := os.WriteFile(file, []byte(tt.yaml), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			var fs *pflag.FlagSet
			if tt.args != nil {
				fs = pflag.NewFlagSet("test", pflag.ContinueOnError)
				BindFlags(fs)
				if err := fs.Parse(tt.args); err != nil {
					t.Fatal(err)
				}
			}

			got, err := Load(file, fs)

			if tt.wantErr != nil {
				t.Logf("error: %v", err)
				if err == nil {
					t.Fatalf("Load succeeded with %+v, want error containing %q", got, tt.wantErr)
				}
				for _, s := range tt.wantErr {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not contain %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			want := Default()
			tt.want(&want)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Load =\n%+v\nwant\n%+v", got, want)
			}
			if fi, err := os.Stat(got.DataDir); err != nil || !fi.IsDir() {
				t.Errorf("data dir %s not created: %v", got.DataDir, err)
			}
			if entries, err := os.ReadDir(got.DataDir); err != nil || len(entries) != 0 {
				t.Errorf("data dir %s not left empty: %v %v", got.DataDir, entries, err)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	clearEnv(t)
	t.Chdir(t.TempDir())
	_, err := Load("nope.yaml", nil)
	if err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("Load(missing file) error = %v, want one naming nope.yaml", err)
	}
}

func TestLoadReadOnlyDataDir(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root can write to a read-only directory")
	}
	clearEnv(t)
	dir := filepath.Join(t.TempDir(), "ro")
	if err := os.Mkdir(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CHATD_DATA_DIR", dir)
	_, err := Load("", nil)
	if err == nil || !strings.Contains(err.Error(), "data_dir") || !strings.Contains(err.Error(), "not writable") {
		t.Fatalf("Load(read-only data dir) error = %v, want data_dir not writable", err)
	}
}

func TestBindFlagsDefaults(t *testing.T) {
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	BindFlags(fs)
	d := Default()
	for flag, want := range map[string]string{"data-dir": d.DataDir, "listen": d.Listen, "http": d.HTTP} {
		f := fs.Lookup(flag)
		if f == nil {
			t.Errorf("--%s not registered", flag)
			continue
		}
		if f.DefValue != want {
			t.Errorf("--%s default = %q, want %q", flag, f.DefValue, want)
		}
		if f.Usage == "" {
			t.Errorf("--%s has no help", flag)
		}
	}
}

func TestSettings(t *testing.T) {
	settings := Settings()
	if len(settings) != len(help) {
		t.Errorf("Settings has %d keys, help documents %d: keep help in step with Config", len(settings), len(help))
	}
	byKey := map[string]Setting{}
	for _, s := range settings {
		byKey[s.Key] = s
		if s.Help == "" {
			t.Errorf("key %s has no help text", s.Key)
		}
	}
	tests := []struct {
		key, env, def string
	}{
		{"data_dir", "CHATD_DATA_DIR", "data"},
		{"auth.secret", "CHATD_AUTH_SECRET", `""`},
		{"queue.sync", "CHATD_QUEUE_SYNC", "batch"},
		{"queue.sync_interval", "CHATD_QUEUE_SYNC_INTERVAL", "100ms"},
		{"queue.message_ttl", "CHATD_QUEUE_MESSAGE_TTL", "720h"},
		{"queue.max_queue_messages", "CHATD_QUEUE_MAX_QUEUE_MESSAGES", "1000000"},
		{"limits.max_inflight", "CHATD_LIMITS_MAX_INFLIGHT", "64"},
		{"log.format", "CHATD_LOG_FORMAT", "text"},
		{"groups.max_per_user", "CHATD_GROUPS_MAX_PER_USER", "1000"},
		{"groups.cache_members", "CHATD_GROUPS_CACHE_MEMBERS", "1000000"},
	}
	for _, tt := range tests {
		s, ok := byKey[tt.key]
		if !ok {
			t.Errorf("key %s missing from Settings", tt.key)
			continue
		}
		if s.Env != tt.env || s.Default != tt.def {
			t.Errorf("%s: env %s default %s, want %s %s", tt.key, s.Env, s.Default, tt.env, tt.def)
		}
	}
}

func TestFormatDuration(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want string
	}{
		{720 * time.Hour, "720h"},
		{90 * time.Minute, "1h30m"},
		{10 * time.Minute, "10m"},
		{90 * time.Second, "1m30s"},
		{100 * time.Millisecond, "100ms"},
		{0, "0s"},
	}
	for _, tt := range tests {
		if got := formatDuration(tt.d); got != tt.want {
			t.Errorf("formatDuration(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
}
