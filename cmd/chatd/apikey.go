package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/config"
)

const apikeyLong = `Make, list and revoke the API keys of app backends.

An API key authorizes calls to the server API (docs/PROTOCOL.md section 7,
"Server API"): Authorization: Bearer chatd_... It is printed once, when it
is made; the server stores only a hash of it. It never works as an MQTT
password, and a user's access token never works on the server API.

Scopes: send (messages from server-named senders), moderate, read, erase.

On one node the keys are in the data dir (apikeys.json), and a running
server sees a change at once. In cluster mode (--cluster, or cluster.enabled)
they are in a replicated JetStream bucket that every node reads; the command
connects to cluster.url, or else to this node's NATS at cluster.nats_listen,
with cluster.password and cluster.tls, so run it on a node while it runs.

  KEY=$(chatd apikey create billing --scope send --data-dir data)
  chatd apikey list --data-dir data
  chatd apikey revoke 3f2a9c0d1b2e4f5a --data-dir data`

// newAPIKeyCmd returns `chatd apikey` and its subcommands.
func newAPIKeyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "apikey",
		Short: "Make, list and revoke API keys for app backends",
		Long:  apikeyLong,
	}
	var scopes string
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Make an API key and print it once",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			k, key, err := apikeys.New(args[0], splitScopes(scopes), time.Now())
			if err != nil {
				return err
			}
			return withKeys(cmd, func(s apikeys.Store) error {
				if err := s.Put(k); err != nil {
					return err
				}
				if _, err := fmt.Fprintln(cmd.OutOrStdout(), key); err != nil {
					return fmt.Errorf("write key: %w", err)
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "API key %s (%s, scopes %s) made; it is shown only now\n", k.ID, k.Name, strings.Join(k.Scopes, ","))
				return nil
			})
		},
	}
	create.Flags().StringVar(&scopes, "scope", "", "comma-separated scopes: "+strings.Join(apikeys.Scopes, ", ")+" (required)")
	list := &cobra.Command{
		Use:   "list",
		Short: "List the API keys (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			return withKeys(cmd, func(s apikeys.Store) error {
				keys, err := s.List()
				if err != nil {
					return err
				}
				return printKeys(cmd.OutOrStdout(), keys)
			})
		},
	}
	revoke := &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke an API key at once",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			return withKeys(cmd, func(s apikeys.Store) error {
				err := s.Delete(args[0])
				if errors.Is(err, apikeys.ErrUnknown) {
					return fmt.Errorf("no API key %q (chatd apikey list shows their IDs)", args[0])
				}
				return err
			})
		},
	}
	for _, c := range []*cobra.Command{create, list, revoke} {
		c.Flags().String("config", "", "YAML configuration file, as for chatd serve; optional")
		config.BindDataDirFlag(c.Flags())
		c.Flags().Bool("cluster", false, "the keys of a cluster, in JetStream (key cluster.enabled)")
		cmd.AddCommand(c)
	}
	return cmd
}

func splitScopes(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// withKeys opens the key store the settings name, runs fn on it and
// closes what it opened.
func withKeys(cmd *cobra.Command, fn func(apikeys.Store) error) error {
	configFile, _ := cmd.Flags().GetString("config")
	cfg, err := config.Load(configFile, cmd.Flags())
	if err != nil {
		return err
	}
	if !cfg.Cluster.Enabled {
		return fn(apikeys.NewFile(filepath.Join(cfg.DataDir, apikeys.FileName)))
	}
	url := cfg.Cluster.URL
	if url == "" {
		url = "nats://" + cfg.Cluster.NATSListen
	}
	ncfg := natsnode.Config{URL: url, Name: "chatd apikey", Password: cfg.Cluster.Password, CredsFile: cfg.Cluster.Credentials,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), ReadyTimeout: 10 * time.Second}
	if t := cfg.Cluster.TLS; t.Enabled() {
		ncfg.TLS = &natsnode.TLSFiles{CertFile: t.CertFile, KeyFile: t.KeyFile, CAFile: t.CAFile}
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
	defer cancel()
	node, err := natsnode.Start(ctx, ncfg)
	if err != nil {
		return fmt.Errorf("reach the cluster's NATS at %s: %w", url, err)
	}
	defer node.Shutdown()
	s, err := apikeys.NewKV(ctx, node.JetStream(), broker.APIKeysBucket, cfg.Cluster.Replicas)
	if err != nil {
		return err
	}
	return fn(s)
}

func printKeys(w io.Writer, keys []apikeys.Key) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSCOPES\tCREATED")
	for _, k := range keys {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", k.ID, k.Name, strings.Join(k.Scopes, ","), time.Unix(k.Created, 0).UTC().Format(time.RFC3339))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write list: %w", err)
	}
	return nil
}
