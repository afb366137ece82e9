package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
)

// shutdownTimeout bounds a graceful shutdown, after which Close gives up
// waiting for clients so the process does not hang on a stuck connection.
const shutdownTimeout = 10 * time.Second

// newServeCmd returns `chatd serve`.
func newServeCmd() *cobra.Command {
	var (
		configFile string
		dev        bool
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the chat server",
		Long:  serveLong(),
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// From here on errors are about the run, not the command line.
			cmd.SilenceUsage = true
			load := func() (config.Config, error) {
				cfg, err := config.Load(configFile, cmd.Flags())
				if err == nil && dev {
					cfg = devMode(cfg)
				}
				return cfg, err
			}
			cfg, err := load()
			if err != nil {
				return err
			}
			level := new(slog.LevelVar)
			logger, err := newLogger(cfg.Log, level, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			slog.SetDefault(logger)

			// SIGHUP is caught from here on: during a start, which may be
			// long in a cluster, its default action would end the process;
			// it is acted on once the server runs.
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			done := make(chan struct{})
			defer close(done)
			go exitOnSecondSignal(ctx, stop, done, logger)
			return serve(ctx, cfg, logger, reloader{load: load, level: level, hup: hup})
		},
	}
	cmd.Flags().StringVar(&configFile, "config", "", "YAML configuration file; optional, see the keys above")
	cmd.Flags().BoolVar(&dev, "dev", false, "development mode, as make run uses it: the chat page at / with sign-in as any user (web.enabled, web.dev), MQTT over WebSocket on "+devWebSocket+" unless websocket.listen is set; never in production")
	config.BindFlags(cmd.Flags())
	return cmd
}

// devWebSocket is the WebSocket listener --dev opens for the chat page
// when none is configured.
const devWebSocket = "127.0.0.1:8083"

// devMode returns cfg with what --dev turns on.
func devMode(cfg config.Config) config.Config {
	cfg.Web.Enabled, cfg.Web.Dev = true, true
	if cfg.WebSocket.Listen == "" {
		cfg.WebSocket.Listen = devWebSocket
	}
	return cfg
}

// reloader reads the configuration again on SIGHUP.
type reloader struct {
	// load reads the configuration as at start: file, environment, flags.
	load func() (config.Config, error)
	// level is the logger's level, which a reload may change.
	level *slog.LevelVar
	// hup receives SIGHUP.
	hup <-chan os.Signal
}

// reload applies a new configuration to srv, logging what it changed and
// what waits for a restart; a configuration that does not load changes
// nothing.
func (r reloader) reload(srv *broker.Server, logger *slog.Logger) {
	cfg, err := r.load()
	var done broker.Reloaded
	if err == nil {
		done, err = srv.Reload(cfg)
	}
	if err != nil {
		logger.Error("reload refused: running on with the configuration as it was", "error", err)
		return
	}
	if err := r.level.UnmarshalText([]byte(cfg.Log.Level)); err != nil {
		logger.Error("reload: log.level", "error", err)
	}
	logger.Info("configuration reloaded", "applied", done.Applied, "tls_certificate_reread", done.Certificate)
	if len(done.Restart) > 0 {
		logger.Warn("configuration changes that need a restart to apply", "keys", done.Restart)
	}
}

// serve runs the server until ctx is done, then shuts it down gracefully;
// SIGHUP reloads the configuration meanwhile.
func serve(ctx context.Context, cfg config.Config, logger *slog.Logger, rl reloader) error {
	secret, dev, err := token.ResolveSecret(cfg.Auth.Secret, cfg.DataDir)
	if err != nil {
		return fmt.Errorf("token secret: %w", err)
	}
	if dev {
		logger.Warn("auth.secret is not set: using a development secret; set auth.secret (CHATD_AUTH_SECRET) in production",
			"secret_file", filepath.Join(cfg.DataDir, token.DevSecretFile),
			"get_a_token", "chatd token USER --data-dir "+shellQuote(cfg.DataDir))
	}
	logMemoryLimit(cfg.Memory, logger)
	srv, err := broker.New(broker.Options{Config: cfg, Secret: secret, Logger: logger})
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	if err := srv.Start(); err != nil {
		return errors.Join(fmt.Errorf("start: %w", err), shutdown(srv))
	}
	httpAddr := srv.HTTPAddr()
	if httpAddr == "" {
		httpAddr = "disabled"
	}
	attrs := []any{"mqtt", srv.MQTTAddr(), "http", httpAddr, "data_dir", cfg.DataDir, "sync", cfg.Queue.Sync}
	if a := srv.TLSAddr(); a != "" {
		attrs = append(attrs, "mqtt_tls", a)
	}
	if a := srv.WebSocketAddr(); a != "" {
		attrs = append(attrs, "websocket", a)
	}
	logger.Info("chatd started", append(attrs, "version", broker.Version())...)
	if cfg.Web.Enabled && httpAddr != "disabled" {
		logger.Info("chat page at http://"+httpAddr+"/ and dashboard at http://"+httpAddr+"/dashboard.html", "dir", cfg.Web.Dir)
	}
	if cfg.Web.Dev {
		logger.Warn("DEVELOPMENT MODE (web.dev, --dev): ANYONE WHO CAN REACH THE HTTP LISTENER CAN SIGN IN AS ANY USER " +
			"through POST /v1/dev/token; never run it in production")
	}

	for running := true; running; {
		select {
		case <-ctx.Done():
			running = false
		case <-rl.hup:
			logger.Info("SIGHUP: reloading the configuration")
			rl.reload(srv, logger)
		}
	}
	logger.Info("shutting down; signal again to exit immediately", "timeout", shutdownTimeout)
	if err := shutdown(srv); err != nil {
		return err
	}
	logger.Info("chatd stopped")
	return nil
}

// shutdown closes srv within shutdownTimeout.
func shutdown(srv *broker.Server) error {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Close(ctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// exitOnSecondSignal waits for shutdown to begin and then exits the process
// with status 1 on another SIGINT or SIGTERM, for an operator who will not
// wait for a slow graceful shutdown. It returns when done is closed.
func exitOnSecondSignal(ctx context.Context, stop context.CancelFunc, done <-chan struct{}, logger *slog.Logger) {
	select {
	case <-ctx.Done():
	case <-done:
		return
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	// sigs is registered before stop unregisters the first handler, so a
	// second signal is always caught rather than getting the default action,
	// which would kill the process by signal instead of exiting with status 1.
	stop()
	select {
	case sig := <-sigs:
		logger.Error("second signal during shutdown: exiting immediately", "signal", sig.String())
		os.Exit(1)
	case <-done:
	}
}

// newLogger returns a logger writing c.Format to w at level, which it
// sets to c.Level.
func newLogger(c config.Log, level *slog.LevelVar, w io.Writer) (*slog.Logger, error) {
	if err := level.UnmarshalText([]byte(c.Level)); err != nil {
		return nil, fmt.Errorf("log.level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.Format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("log.format: %q is not one of text, json", c.Format)
	}
}

// shellQuote quotes s for a POSIX shell when it needs it, so the suggested
// command can be pasted as is.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/:@%+=,") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// wrap breaks text into lines of at most width characters, each starting
// with indent and ending with a newline.
func wrap(text, indent string, width int) string {
	var b strings.Builder
	line := indent
	for _, word := range strings.Fields(text) {
		if line != indent && len(line)+1+len(word) > width {
			b.WriteString(line + "\n")
			line = indent
		}
		if line != indent {
			line += " "
		}
		line += word
	}
	b.WriteString(line + "\n")
	return b.String()
}

// serveLong is the help of `chatd serve`, with the table of keys generated
// from the config package so it cannot fall out of date.
func serveLong() string {
	var b strings.Builder
	b.WriteString(`Run the chat server until SIGINT or SIGTERM.

On SIGINT or SIGTERM the server stops accepting connections, finishes the
commits in progress and closes its storage, within 10 seconds; a second
signal exits at once with status 1. Either way every message already
acknowledged with a PUBACK is kept, as queue.sync promises.

On SIGHUP it reads its configuration again and applies, without dropping a
connection: the TLS certificate (read again even from the same files, as
a renewal leaves them), log.level, limits.connect_rate,
limits.max_connections_per_user, limits.publish_rate,
limits.publish_bytes_rate, limits.publish_max_delay, and the URLs of
push.webhook and events.webhook. The log says what changed and which other
changes wait for a restart; a configuration that does not load changes
nothing. "chatd checkconfig" checks a file first; "chatd defaultconfig"
prints one with every key.

Settings, highest precedence first:
  1. the --data-dir, --listen, --http, --cluster and --node flags;
  2. environment variables: CHATD_ and the key in upper case with dots as
     underscores, e.g. CHATD_QUEUE_SYNC=always, CHATD_AUTH_SECRET=...;
  3. the YAML file given with --config;
  4. the defaults below.
An unknown key or an invalid value stops start-up with an error naming the key.
Durations are written with a unit: 100ms, 30s, 720h. Example file:

  listen: 0.0.0.0:1883
  auth:
    secret: a-long-random-string
  queue:
    sync: always
  limits:
    max_inflight: 32

Without auth.secret the server signs and checks tokens with a development
secret it creates in data_dir; mint tokens for it with "chatd token USER".

A cluster node: chatd serve --cluster --node n1 (and the cluster.* keys
for the NATS routes); docs/cluster.md walks a three-node cluster.

Keys (default, environment variable):
`)
	for _, s := range config.Settings() {
		fmt.Fprintf(&b, "  %s = %s  (%s)\n%s", s.Key, s.Default, s.Env, wrap(s.Help, "      ", 78))
	}
	return strings.TrimRight(b.String(), "\n")
}
