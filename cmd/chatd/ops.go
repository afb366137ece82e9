package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"time"

	"github.com/spf13/cobra"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/config"
)

// newVersionCmd returns `chatd version`.
func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version, commit and Go version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "chatd %s (%s, %s/%s)\n", broker.Version(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
			return err
		},
	}
}

const checkConfigLong = `Check a configuration without starting the server: the file, the CHATD_*
environment variables and the flags, loaded and validated exactly as
"chatd serve" would (unknown keys, wrong types, invalid values, a data
dir that cannot be written), and the files it names read: TLS
certificates and keys, the cluster's CA, identity providers' public
keys, the chat page's directory. Exits 0 when all is well, and 1 otherwise,
naming the first invalid setting, or every file that cannot be read.
The systemd unit runs it before each start.`

// newCheckConfigCmd returns `chatd checkconfig`.
func newCheckConfigCmd() *cobra.Command {
	var configFile string
	cmd := &cobra.Command{
		Use:   "checkconfig",
		Short: "Validate a configuration without starting",
		Long:  checkConfigLong,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			cfg, err := config.Load(configFile, cmd.Flags())
			if err != nil {
				return err
			}
			if err := cfg.CheckFiles(); err != nil {
				return fmt.Errorf("config: %w", err)
			}
			where := configFile
			if where == "" {
				where = "defaults and environment"
			}
			mode := "single node (Badger in " + cfg.DataDir + ")"
			if cfg.Cluster.Enabled {
				mode = "cluster node " + cfg.Cluster.Node
			}
			auth := "auth.secret"
			switch {
			case cfg.Auth.Secret == "" && len(cfg.Auth.Issuers) == 0:
				auth = "the development secret in the data dir (set auth.secret in production)"
			case cfg.Auth.Secret == "":
				auth = fmt.Sprintf("%d identity provider(s)", len(cfg.Auth.Issuers))
			case len(cfg.Auth.Issuers) > 0:
				auth = fmt.Sprintf("auth.secret and %d identity provider(s)", len(cfg.Auth.Issuers))
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s: ok\n  %s, MQTT on %s, HTTP on %s\n  tokens: %s\n",
				where, mode, cfg.Listen, orNone(cfg.HTTP), auth)
			if cfg.Web.Dev {
				err = errors.Join(err, warn(cmd, "web.dev is on: anyone who reaches the HTTP listener can sign in as any user"))
			}
			return err
		},
	}
	cmd.Flags().StringVar(&configFile, "config", "", "YAML configuration file to check")
	config.BindFlags(cmd.Flags())
	return cmd
}

// warn writes a warning line to stderr.
func warn(cmd *cobra.Command, text string) error {
	_, err := fmt.Fprintln(cmd.ErrOrStderr(), "warning:", text)
	return err
}

func orNone(addr string) string {
	if addr == "" {
		return "none"
	}
	return addr
}

// newDefaultConfigCmd returns `chatd defaultconfig`.
func newDefaultConfigCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "defaultconfig",
		Short: "Print a configuration file with every setting at its default, commented",
		Long: `Print a YAML configuration file that sets every key to its built-in
default, each under a comment saying what it does and which environment
variable overrides it. Start a configuration from it:

  chatd defaultconfig > /etc/chatd/chatd.yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprint(cmd.OutOrStdout(), config.DefaultYAML())
			return err
		},
	}
}

// newProbeCmd returns `chatd probe`.
func newProbeCmd() *cobra.Command {
	var (
		addr    string
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "probe [ready|live]",
		Short: "Ask a running node whether it is ready (or alive), for container health checks",
		Long: `Ask a running node's HTTP listener whether it is ready to serve
(GET /readyz, the default) or alive (GET /healthz), and exit 0 if so, 1
if not, printing the answer. For health checks where no HTTP client is
at hand, such as a container built from the chatd binary alone:

  HEALTHCHECK: ["CMD", "/chatd", "probe", "--http", "127.0.0.1:8080"]`,
		Args:      cobra.MatchAll(cobra.MaximumNArgs(1), cobra.OnlyValidArgs),
		ValidArgs: []string{"ready", "live"},
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			path := "/readyz"
			if len(args) == 1 && args[0] == "live" {
				path = "/healthz"
			}
			client := &http.Client{Timeout: timeout}
			resp, err := client.Get("http://" + addr + path)
			if err != nil {
				return fmt.Errorf("probe: %w", err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
			if err != nil {
				return fmt.Errorf("probe: read the answer: %w", err)
			}
			fmt.Fprint(cmd.OutOrStdout(), string(body))
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("probe: %s answered %s", path, resp.Status)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "http", config.Default().HTTP, "the node's HTTP listener, host:port")
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "how long to wait for the answer")
	return cmd
}
