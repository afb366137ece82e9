package main

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/config"
)

const tokenLong = `Print an access token for USER on stdout, for development and tests.

The token is an HS256 JWT with sub = USER, signed with the server's secret:
auth.secret when it is configured (in the --config file or CHATD_AUTH_SECRET),
otherwise the development secret in the data dir, which is created if missing
and is the one "chatd serve" uses with the same data dir. Settings are read
exactly as "chatd serve" reads them.

USER is 1-64 characters of A-Z a-z 0-9 _ . -

  TOKEN=$(chatd token alice --data-dir data --ttl 1h)`

// newTokenCmd returns `chatd token`.
func newTokenCmd() *cobra.Command {
	var (
		configFile string
		ttl        time.Duration
	)
	cmd := &cobra.Command{
		Use:   "token USER",
		Short: "Print an access token for USER",
		Long:  tokenLong,
		Args: func(cmd *cobra.Command, args []string) error {
			if err := cobra.ExactArgs(1)(cmd, args); err != nil {
				return err
			}
			if !topic.ValidUser(args[0]) {
				return fmt.Errorf("user %q: must be 1-64 characters of A-Z a-z 0-9 _ . -", args[0])
			}
			if ttl <= 0 {
				return fmt.Errorf("--ttl %v: must be positive", ttl)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			cfg, err := config.Load(configFile, cmd.Flags())
			if err != nil {
				return err
			}
			secret, dev, err := token.ResolveSecret(cfg.Auth.Secret, cfg.DataDir)
			if err != nil {
				return fmt.Errorf("token secret: %w", err)
			}
			tok, err := token.Mint(secret, args[0], ttl)
			if err != nil {
				return err
			}
			if _, err := fmt.Fprintln(cmd.OutOrStdout(), tok); err != nil {
				return fmt.Errorf("write token: %w", err)
			}
			if dev {
				fmt.Fprintf(cmd.ErrOrStderr(), "note: signed with the development secret %s; only a server using that data dir without auth.secret accepts it\n",
					filepath.Join(cfg.DataDir, token.DevSecretFile))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&configFile, "config", "", "YAML configuration file, as for chatd serve; optional")
	config.BindDataDirFlag(cmd.Flags())
	cmd.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "how long the token is valid, e.g. 1h, 720h")
	return cmd
}
