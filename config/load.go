package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"reflect"
	"slices"
	"strings"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// flagKeys maps the command-line flags that BindFlags registers to their keys.
var flagKeys = []struct{ flag, key string }{
	{"data-dir", "data_dir"},
	{"listen", "listen"},
	{"http", "http"},
	{"cluster", "cluster.enabled"},
	{"node", "cluster.node"},
}

// BindFlags registers --data-dir, --listen, --http, --cluster and --node
// on fs, with the built-in defaults, for Load to read.
func BindFlags(fs *pflag.FlagSet) {
	BindDataDirFlag(fs)
	d := Default()
	fs.String("listen", d.Listen, "MQTT TCP listen address, host:port (key listen, env "+EnvName("listen")+")")
	fs.String("http", d.HTTP, "HTTP listen address for /healthz, /metrics and the API, host:port; empty disables it (key http, env "+EnvName("http")+")")
	fs.Bool("cluster", false, "run as a cluster node, queues in NATS JetStream; see the cluster.* keys (key cluster.enabled, env "+EnvName("cluster.enabled")+")")
	fs.String("node", "", "this cluster node's name, unique and stable (key cluster.node, env "+EnvName("cluster.node")+")")
}

// BindDataDirFlag registers only --data-dir on fs, for commands such as
// `chatd token` that need the data dir but no listener.
func BindDataDirFlag(fs *pflag.FlagSet) {
	fs.String("data-dir", Default().DataDir, "directory for the durable queue and the development secret, created if missing (key data_dir, env "+EnvName("data_dir")+")")
}

// Load returns the configuration built from, highest precedence first: the
// flags in flags that were set on the command line, CHATD_* environment
// variables, the YAML file (skipped when file is ""), and Default(). It refuses
// unknown keys, values of the wrong type, invalid settings and a data_dir that
// cannot be created or written, naming the offending key. flags may be nil.
func Load(file string, flags *pflag.FlagSet) (Config, error) {
	cfg, err := load(file, flags)
	if err != nil {
		if file == "" {
			return Config{}, fmt.Errorf("config: %w", err)
		}
		return Config{}, fmt.Errorf("config %s: %w", file, err)
	}
	return cfg, nil
}

func load(file string, flags *pflag.FlagSet) (Config, error) {
	v := viper.New()
	v.SetEnvPrefix(EnvPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	// Viper only consults the environment for keys it already knows, so
	// every key gets its default registered, not just the ones in the file.
	known := map[string]bool{}
	for _, l := range leaves(Default()) {
		v.SetDefault(l.key, l.value)
		known[l.key] = true
	}

	if file != "" {
		v.SetConfigFile(file)
		// The file is YAML whatever its extension, so that a name like
		// chatd.conf works and a JSON file (a subset of YAML) does too.
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return Config{}, fmt.Errorf("read: %w", err)
		}
		if err := checkKnown(v.AllKeys(), known); err != nil {
			return Config{}, err
		}
	}

	if flags != nil {
		for _, fk := range flagKeys {
			if f := flags.Lookup(fk.flag); f != nil && f.Changed {
				v.Set(fk.key, f.Value.String())
			}
		}
	}

	var cfg Config
	hook := viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(
		strictNumbers,
		issuersFromJSON,
		mapstructure.StringToTimeDurationHookFunc(),
	))
	if err := v.UnmarshalExact(&cfg, hook); err != nil {
		return Config{}, explainDecode(err, v, flags)
	}
	if err := cfg.Validate(); err != nil {
		// Validate's errors start with the key they are about.
		if key, _, ok := strings.Cut(err.Error(), ":"); ok {
			return Config{}, fmt.Errorf("%w%s", err, sourceOf(key, flags))
		}
		return Config{}, err
	}
	if err := checkDataDir(cfg.DataDir); err != nil {
		return Config{}, fmt.Errorf("%w%s", err, sourceOf("data_dir", flags))
	}
	return cfg, nil
}

// checkKnown refuses keys that are neither a setting nor a section holding
// settings, so a misspelt key is reported instead of silently ignored.
func checkKnown(keys []string, known map[string]bool) error {
	var unknown []string
	for _, k := range keys {
		if known[k] || isSection(k, known) {
			continue
		}
		unknown = append(unknown, k)
	}
	if len(unknown) == 0 {
		return nil
	}
	slices.Sort(unknown)
	return fmt.Errorf("unknown key %s (see `chatd serve --help` for the known keys)", strings.Join(unknown, ", "))
}

// isSection reports whether k is a prefix of a known key, such as queue.
func isSection(k string, known map[string]bool) bool {
	for key := range known {
		if strings.HasPrefix(key, k+".") {
			return true
		}
	}
	return false
}

// strictNumbers refuses the numeric forms that weakly typed decoding would
// otherwise accept silently: a duration without a unit (which would mean
// nanoseconds) and a fractional number for an integer setting.
func strictNumbers(from, to reflect.Type, data any) (any, error) {
	fk := from.Kind()
	isNum := fk >= reflect.Int && fk <= reflect.Float64
	switch {
	case to == durationType && from != durationType && isNum:
		return nil, errors.New("a duration needs a unit, like 100ms, 30s or 720h")
	case to.Kind() >= reflect.Int && to.Kind() <= reflect.Int64 && (fk == reflect.Float32 || fk == reflect.Float64):
		if f := reflect.ValueOf(data).Float(); f != math.Trunc(f) {
			return nil, errors.New("must be a whole number")
		}
	}
	return data, nil
}

// issuersFromJSON decodes auth.issuers given as a string, a JSON list
// (an environment variable), as the file's YAML list would be.
func issuersFromJSON(from, to reflect.Type, data any) (any, error) {
	if from.Kind() != reflect.String || to != reflect.TypeFor[[]token.Issuer]() {
		return data, nil
	}
	s := strings.TrimSpace(data.(string))
	if s == "" {
		return []token.Issuer{}, nil
	}
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	var out []token.Issuer
	if err := dec.Decode(&out); err != nil {
		return nil, fmt.Errorf("a JSON list of issuers: %w", err)
	}
	return out, nil
}

// explainDecode rewrites mapstructure's multi-line error report as one line
// per bad key, each with the offending value and where it came from.
func explainDecode(err error, v *viper.Viper, flags *pflag.FlagSet) error {
	des := decodeErrors(err)
	if len(des) == 0 {
		return err
	}
	msgs := make([]string, 0, len(des))
	for _, de := range des {
		key := de.Name()
		val := v.Get(key)
		value := fmt.Sprintf("%v", val)
		if s, ok := val.(string); ok {
			value = fmt.Sprintf("%q", s)
		}
		msgs = append(msgs, fmt.Sprintf("%s: bad value %s%s: %v", key, value, sourceOf(key, flags), de.Unwrap()))
	}
	return errors.New(strings.Join(msgs, "; "))
}

// sourceOf says which flag or environment variable set key, if any, so an
// error about a value the file does not contain does not send the user
// looking for it there.
func sourceOf(key string, flags *pflag.FlagSet) string {
	if flags != nil {
		for _, fk := range flagKeys {
			if f := flags.Lookup(fk.flag); fk.key == key && f != nil && f.Changed {
				return " (from --" + fk.flag + ")"
			}
		}
	}
	if env := EnvName(key); os.Getenv(env) != "" {
		return " (from " + env + ")"
	}
	return ""
}

// decodeErrors returns the innermost per-key errors in err's tree.
func decodeErrors(err error) []*mapstructure.DecodeError {
	var out []*mapstructure.DecodeError
	switch e := err.(type) {
	case *mapstructure.DecodeError:
		if inner := decodeErrors(e.Unwrap()); len(inner) > 0 {
			return inner
		}
		return []*mapstructure.DecodeError{e}
	case interface{ Unwrap() []error }:
		for _, x := range e.Unwrap() {
			out = append(out, decodeErrors(x)...)
		}
	case interface{ Unwrap() error }:
		out = decodeErrors(e.Unwrap())
	}
	return out
}

// checkDataDir creates dir and proves it writable now, so that a bad
// data_dir is reported at start-up with its key rather than later as a
// storage error.
func checkDataDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data_dir %q cannot be created: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, ".chatd-write-probe-*")
	if err != nil {
		return fmt.Errorf("data_dir %q is not writable: %w", dir, err)
	}
	closeErr := f.Close()
	if err := os.Remove(f.Name()); err != nil {
		return fmt.Errorf("data_dir %q: remove write probe: %w", dir, err)
	}
	if closeErr != nil {
		return fmt.Errorf("data_dir %q: close write probe: %w", dir, closeErr)
	}
	return nil
}
