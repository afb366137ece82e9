// Command loadtest drives a chatd server, or any MQTT broker with --plain,
// with many simulated phones over real MQTT connections and reports what
// their users would feel: throughput, latency, and whether every
// acknowledged message arrived.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/chatd/chatd/loadtest"
	"github.com/chatd/chatd/loadtest/workload"
)

// exitError carries the exit status a run calls for through cobra.
type exitError struct{ code int }

// Error describes the exit status.
func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func main() {
	// toxiproxy's bandwidth toxic logs through zerolog's global logger at
	// trace level on every change of the flaky scenario's faults.
	zerolog.SetGlobalLevel(zerolog.InfoLevel)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd(os.Stdout, os.Stderr).ExecuteContext(ctx)
	stop()
	var ee exitError
	switch {
	case errors.As(err, &ee):
		os.Exit(ee.code)
	case err != nil:
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(2)
	}
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "loadtest",
		Short:         "Drive a chat server with simulated phones and report what users feel",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(newRunCmd(stdout, stderr), newAgentCmd(stderr), newScenariosCmd(stdout), newWorkloadsCmd(stdout), newCompareCmd(stdout))
	return root
}

func newScenariosCmd(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "scenarios",
		Short: "List the scenarios",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			for _, s := range loadtest.Scenarios {
				if _, err := fmt.Fprintf(stdout, "%-8s %s\n", s.Name, s.Doc); err != nil {
					return fmt.Errorf("list scenarios: %w", err)
				}
			}
			return nil
		},
	}
}

func newWorkloadsCmd(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "workloads",
		Short: "List the chat workloads built in, for run workload --workload NAME",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			for _, name := range workload.Shipped() {
				w, err := workload.Load(name)
				if err != nil {
					return err
				}
				if _, err := fmt.Fprintf(stdout, "%s\n  %s\n", name, w.About); err != nil {
					return fmt.Errorf("list workloads: %w", err)
				}
			}
			return nil
		},
	}
}

func newCompareCmd(stdout io.Writer) *cobra.Command {
	ours, theirs := "ours", "theirs"
	cmd := &cobra.Command{
		Use:   "compare OURS.json THEIRS.json [OURS.json THEIRS.json]...",
		Short: "Print a Markdown table comparing pairs of JSON reports of the same scenarios",
		Long: `Print a Markdown table comparing pairs of JSON reports of the same
scenarios, one row per metric, with the ratio ours/theirs. Either report
of a pair may be given as "-" for a run made against one server only:
its column then shows "–".`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 || len(args)%2 != 0 {
				return errors.New("want pairs of reports: OURS.json THEIRS.json")
			}
			return nil
		},
		RunE: func(_ *cobra.Command, args []string) error {
			var pairs [][2]*loadtest.Report
			for i := 0; i < len(args); i += 2 {
				if args[i] == noReport && args[i+1] == noReport {
					return fmt.Errorf("pair %d: %s for both reports", i/2+1, noReport)
				}
				var pair [2]*loadtest.Report
				for j, path := range args[i : i+2] {
					if path == noReport {
						continue
					}
					rep, err := loadtest.ReadReport(path)
					if err != nil {
						return err
					}
					pair[j] = rep
				}
				pairs = append(pairs, pair)
			}
			return loadtest.WriteComparison(stdout, ours, theirs, pairs)
		},
	}
	cmd.Flags().StringVar(&ours, "ours", ours, "column name of the first report of each pair")
	cmd.Flags().StringVar(&theirs, "theirs", theirs, "column name of the second report of each pair")
	return cmd
}

// noReport stands for the missing report of a compare pair.
const noReport = "-"

func newRunCmd(stdout, stderr io.Writer) *cobra.Command {
	cfg := loadtest.DefaultConfig()
	var (
		secret, jsonPath, htmlPath string
		csvPath, metricsAddr       string
		quiet                      bool
		thresholds, agents         []string
		workloadName               string
	)
	names := make([]string, len(loadtest.Scenarios))
	for i, s := range loadtest.Scenarios {
		names[i] = s.Name
	}
	cmd := &cobra.Command{
		Use:   "run SCENARIO",
		Short: "Run one scenario (" + strings.Join(names, ", ") + ")",
		Long: `Run one scenario against a broker and report sent, PUBACKed, delivered,
duplicates, lost and out-of-order messages, throughput and latency
percentiles. Every run stops by itself. The exit status is 0 when the run
passed, 1 when messages were lost, misrouted or reordered, 2 on any other
error, 3 when only a --threshold failed.

--threshold gates a run in CI, as k6's thresholds do: FIGURE OP VALUE,
repeated, each checked against the report; the table, the JSON (verdict)
and the HTML report say which held. FIGURE is STAT(LATENCY), with STAT
one of p50, p90, p99, p99.9, max, mean, count and LATENCY one of
send->deliver, send->PUBACK, send->receipt, send->sent copy,
CONNECT->CONNACK, CONNECT->SUBACK (VALUE in ms, or with a unit: us, ms,
s, m); a short name: lost, duplicates, refused, misrouted,
order_violations, in_flight, sent, acked, delivered, unique, throughput,
send_rate; reason(PACKET:CODE), how many times the broker answered an
MQTT 5 phone with a reason code, as reason(puback:0x97) (0 when never);
or any number of the JSON report by its path, such as
connections.reconnects or server.avg_cpu_percent. OP is < <= > >= == !=.
A FIGURE the report does not have is an error (exit 2).

--protocol 5 makes every simulated phone an MQTT 5 client (paho.golang)
instead of MQTT 3.1.1, with the same persistent session, reconnection and
accounting; --protocol-mix 5:70,3:30 gives each version its share of the
phones instead, interleaved by client slot. --receive-maximum N sends
Receive Maximum N in the MQTT 5 CONNECT. The report then counts the
clients of each version, the Receive Maximum the broker granted (least
and most), and the MQTT 5 reason codes the broker answered with, by
packet and code (PUBACK 0x97 quota exceeded, DISCONNECT 0x98
administrative action...); a PUBACK refusal counts the message as
refused, not lost.

A cluster is driven by giving --broker one URL per node, comma-separated:
client i connects first to URL i mod n and, when its node goes down, paho
reconnects it to the next URLs in turn; the report counts the clients per
node. --server-cmd may then be given once per node (the Nth command serves
the Nth URL): the crash scenario kills and restarts one node at a time,
round robin, and reports how long the killed node's clients took to be
connected again. Server CPU and memory are measured on the first node only.

--agents HOST:PORT,... runs the chat scenario from several machines, each
running "loadtest agent": this command is then the coordinator. Agent k
drives its own share of --users (user IDs PREFIX-aK-uN), of --rate and of
--flooders, with seed --seed+k, so that every message stays within one
agent and each agent's accounting is complete on its own; --broker must
be reachable from the agents. The coordinator sends no secret: each agent
has its own --secret (or CHATD_AUTH_SECRET) and --password. It prints a
line as each agent answers, merges the reports (percentiles from the
merged HDR histograms, each second's p99 too; counts, rates and
connections summed; the per-second series aligned by index) and reports,
thresholds and exit status included, as for a run of its own. --csv is
then written at the end, from the merged series; --metrics-listen,
--server-cmd and --server-pid are not for runs on agents. An agent that
cannot be reached, is busy or fails is an error naming it (exit 2).

The workload scenario plays a chat app's day from --workload, a YAML file
or a built-in one (loadtest workloads lists them): users online in
sessions, direct and group messages, read receipts, typing, presence and
media uploads (over --api, chatd's HTTP API), with figures per action:
thresholds take them by path, e.g. workload.actions.dm.deliver_latency.p99_ms.
The file sets --users and --duration unless they are given; --speed N
runs its times N times faster. docs/workloads.md describes the file.`,
		Example: `  loadtest run chat --users 200 --duration 20s
  loadtest run drain --messages 100000
  loadtest run connect --users 10000 --connect-rate 1000 --server-pid $(pgrep -n chatd)
  loadtest run flaky --users 50 --cut-every 2s
  loadtest run crash --server-cmd "bin/chatd serve --data-dir /tmp/d --listen 127.0.0.1:1883" --kill-every 5s
  loadtest run crash --broker tcp://127.0.0.1:18871,tcp://127.0.0.1:18872,tcp://127.0.0.1:18873 \
    --server-cmd "bin/chatd serve --config n1.yaml" --server-cmd "bin/chatd serve --config n2.yaml" \
    --server-cmd "bin/chatd serve --config n3.yaml" --kill-every 5s --server-log /tmp/node.log
  loadtest run restart --server-cmd "bin/chatd serve --data-dir /tmp/d --listen 127.0.0.1:1883" \
    --messages 1000000 --recipients 100 --duration 30m
  loadtest run chat --rate 5000 --users 200 --flooders 1
  loadtest run workload --workload quiet-evening --users 2000 --duration 5m
  loadtest run workload --workload new-year --users 500 --duration 2m --speed 4 --api http://127.0.0.1:8080
  loadtest run chat --plain --broker tcp://127.0.0.1:1884
  loadtest run chat --protocol 5 --receive-maximum 16 --users 200 --duration 20s
  loadtest run chat --protocol-mix 5:70,3:30 --users 200 --duration 20s
  loadtest run chat --rate 1000 --duration 5m --csv series.csv --metrics-listen 127.0.0.1:9464
  loadtest run chat --rate 2000 --duration 30s -q \
    --threshold 'p99(send->deliver)<5ms' --threshold 'lost==0' --threshold 'throughput>=1900'
  loadtest run chat --agents 10.0.0.11:7070,10.0.0.12:7070 --broker tcp://10.0.0.10:1883 \
    --users 20000 --rate 40000 --duration 5m --threshold 'p99(send->deliver)<50ms'`,
		Args:      cobra.MatchAll(cobra.ExactArgs(1), cobra.OnlyValidArgs),
		ValidArgs: names,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg.Scenario = args[0]
			if cmd.Flags().Changed("protocol-mix") && !cmd.Flags().Changed("protocol") {
				// --protocol's default gives way to the mix.
				cfg.Protocol = 0
			}
			if !cmd.Flags().Changed("secret") {
				secret = os.Getenv("CHATD_AUTH_SECRET")
			}
			cfg.Secret = []byte(secret)
			if workloadName != "" {
				if err := useWorkload(&cfg, workloadName, cmd.Flags()); err != nil {
					return err
				}
			}
			var gates []loadtest.Threshold
			for _, s := range thresholds {
				t, err := loadtest.ParseThreshold(s)
				if err != nil {
					return err
				}
				gates = append(gates, t)
			}
			out := reportOut{stdout: stdout, stderr: stderr, gates: gates, jsonPath: jsonPath, htmlPath: htmlPath}
			if len(agents) > 0 {
				if metricsAddr != "" {
					return errors.New("--metrics-listen is not for runs on agents: the coordinator sees no live figures, only the agents' reports at the end")
				}
				// Each agent signs its users' tokens with its own secret.
				cfg.Secret = nil
				var lines io.Writer
				if !quiet {
					lines = stderr
				}
				rep, err := loadtest.RunAgents(cmd.Context(), cfg, agents, lines)
				if rep != nil && csvPath != "" {
					if werr := rep.WriteCSV(csvPath); werr != nil {
						return werr
					}
				}
				return out.finish(rep, err)
			}
			// A configuration that cannot run is refused before the CSV file
			// is created or the metrics listener opened.
			if err := cfg.Validate(); err != nil {
				return err
			}
			var progress loadtest.Progress
			if !quiet {
				// The bar tracks the sending phase; the grace period,
				// usually short, keeps it just short of full.
				expected := cfg.Duration
				if cfg.Scenario == loadtest.ScenarioConnect {
					expected += cfg.Hold
				}
				progress = loadtest.NewProgress(stderr, isTerminal(stderr), expected)
			}
			watchers := []loadtest.Progress{progress}
			if csvPath != "" {
				c, err := loadtest.NewCSVSeries(csvPath)
				if err != nil {
					return err
				}
				watchers = append(watchers, c)
			}
			if metricsAddr != "" {
				e, err := loadtest.NewExporter(metricsAddr, cfg.Scenario)
				if err != nil {
					return errors.Join(err, loadtest.Progresses(watchers...).Done())
				}
				fmt.Fprintf(stderr, "live figures at http://%s/metrics\n", e.Addr())
				watchers = append(watchers, e)
			}
			progress = loadtest.Progresses(watchers...)
			rep, err := loadtest.Run(cmd.Context(), cfg, progress)
			if rep == nil {
				// Run ended before it began, without ending its watchers:
				// the CSV file is closed and the listener stopped here.
				err = errors.Join(err, progress.Done())
			}
			return out.finish(rep, err)
		},
	}
	// Every flag but --quiet defaults to what its variable holds: the
	// defaults of Config, or the zero value.
	f := cmd.Flags()
	flagVar(f.StringVar, &cfg.Broker, "broker", "broker URL: tcp://, ws:// or tls://host:port; for a cluster, one URL per node, comma-separated, clients spread evenly over them")
	flagVar(f.StringVar, &secret, "secret", "HS256 token secret (default $CHATD_AUTH_SECRET)")
	flagVar(f.BoolVar, &cfg.Plain, "plain", "any MQTT broker: no tokens, raw payloads, no envelope")
	flagVar(f.StringVar, &cfg.Topic, "topic", "inbox topic template, %s is the user ID")
	flagVar(f.StringVar, &cfg.Username, "username", "--plain: CONNECT username, %s is the user ID (\"\" sends none)")
	flagVar(f.StringVar, &cfg.Password, "password", "--plain: CONNECT password (\"\" sends none)")
	flagVar(f.StringVar, &cfg.UserPrefix, "user-prefix", "prefix of the simulated user IDs")
	flagVar(f.IntVar, &cfg.Users, "users", "simulated users (chat, flaky, crash, connect)")
	flagVar(f.IntVar, &cfg.Devices, "devices", "chat, flaky, crash: devices per user, client IDs {user}/d0..d{N-1} (1: client ID {user}); each message goes out from one of them and must reach every device of its recipient, its sent copy every other device of its sender (chatd only)")
	flagVar(f.DurationVar, &cfg.Duration, "duration", "sending time; bounds the drain scenario and the connect ramp")
	flagVar(f.DurationVar, &cfg.Grace, "grace", "time allowed at the end for messages still on their way")
	flagVar(f.IntVar, &cfg.Size, "size", "message object size in bytes")
	flagVar(f.Float64Var, &cfg.Rate, "rate", "total messages per second, 0 = as fast as flow control allows")
	flagVar(f.IntVar, &cfg.Inflight, "inflight", "unacknowledged publishes per sender")
	flagVar(f.IntVar, &cfg.Flooders, "flooders", "chat: abusive clients publishing as fast as they can beside the users, to measure what they do to everyone else")
	flagVar(f.DurationVar, &cfg.Keepalive, "keepalive", "MQTT keepalive")
	flagVar(f.DurationVar, &cfg.ConnectTimeout, "connect-timeout", "timeout of one connection attempt")
	flagVar(f.IntVar, &cfg.Messages, "messages", "drain, restart: messages queued for the offline users")
	flagVar(f.IntVar, &cfg.Senders, "senders", "drain, restart: users queueing them")
	flagVar(f.IntVar, &cfg.Recipients, "recipients", "restart: offline users the messages are spread over, round robin; each one's share must fit the server's per-user queue cap (chatd: queue.max_queue_messages)")
	flagVar(f.Float64Var, &cfg.ConnectRate, "connect-rate", "connect: connections per second, 0 = as fast as possible")
	flagVar(f.DurationVar, &cfg.Hold, "hold", "connect: how long to hold the connections once the last is up; server memory is read at its end")
	flagVar(f.IntVar, &cfg.SourceIPs, "source-ips", "spread connections over 127.0.0.1..N (0 = one per 20000 connections)")
	flagVar(f.IntVar, &cfg.ServerPID, "server-pid", "PID of the server on this machine, to measure its CPU and memory (of a cluster: one node's)")
	flagVar(f.StringArrayVar, &cfg.ServerCmds, "server-cmd", "command that starts the server (split on spaces, no shell); the run starts, measures and stops it. "+
		"Repeat it once per --broker URL for a cluster: the nodes start side by side, and only the first one's CPU and memory are measured")
	flagVar(f.StringVar, &cfg.ServerLog, "server-log", "file that receives the output of --server-cmd; with several, node N writes to FILE.N")
	flagVar(f.DurationVar, &cfg.KillEvery, "kill-every", "crash: interval between SIGKILLs (of one node at a time, round robin, with several --server-cmd)")
	flagVar(f.DurationVar, &cfg.Latency, "latency", "flaky: added latency per direction")
	flagVar(f.DurationVar, &cfg.Jitter, "jitter", "flaky: latency jitter")
	flagVar(f.IntVar, &cfg.Bandwidth, "bandwidth", "flaky: KB/s per connection and direction, 0 = unlimited")
	flagVar(f.DurationVar, &cfg.CutEvery, "cut-every", "flaky: interval between connection cuts, 0 = no cuts")
	flagVar(f.DurationVar, &cfg.CutFor, "cut-for", "flaky: length of a cut")
	flagVar(f.StringSliceVar, &cfg.Cuts, "cuts", "flaky: kinds of cut: down (proxy off), reset (TCP RST), stall (data stops, then close)")
	flagVar(f.StringVar, &workloadName, "workload", "workload: a chat workload YAML file, or one built in (loadtest workloads lists them); sets --users and --duration unless given")
	flagVar(f.StringVar, &cfg.API, "api", "workload: chatd's HTTP API base URL, for groups and media uploads")
	flagVar(f.Float64Var, &cfg.Speed, "speed", "workload: run the workload's sessions, absences and think times this many times faster")
	flagVar(f.IntVar, &cfg.Protocol, "protocol", "MQTT version of the simulated phones: 3 (3.1.1) or 5")
	flagVar(f.StringVar, &cfg.ProtocolMix, "protocol-mix", "share of the phones per MQTT version instead of --protocol, percentages summing to 100, e.g. 5:70,3:30")
	flagVar(f.IntVar, &cfg.ReceiveMaximum, "receive-maximum", "MQTT 5: Receive Maximum sent in CONNECT, deliveries the broker may leave unacknowledged per phone (0 = none sent: 65535, for which paho.golang reserves some 512 KiB per phone)")
	flagVar(f.StringVar, &cfg.Label, "label", "what sets this run apart beyond scenario and rate (e.g. \"receipts on\"), shown in the report and by compare")
	flagVar(f.Int64Var, &cfg.Seed, "seed", "random seed for recipients and cuts, 0 = random")
	flagVar(f.StringVar, &jsonPath, "json", "write the report as JSON to this file")
	flagVar(f.StringVar, &htmlPath, "html", "write a self-contained HTML report to this file")
	flagVar(f.StringVar, &csvPath, "csv", "write the per-second series to this CSV file as the run goes")
	flagVar(f.StringVar, &metricsAddr, "metrics-listen", "serve the live figures for Prometheus at http://ADDR/metrics while the run lasts, e.g. 127.0.0.1:9464")
	f.StringSliceVar(&agents, "agents", nil, "chat: run from these agents (HOST:PORT, comma-separated, each running \"loadtest agent\"), each driving its share of the users, and merge their reports (see above)")
	f.BoolVarP(&quiet, "quiet", "q", false, "no live progress on stderr")
	f.StringArrayVar(&thresholds, "threshold", nil, "pass/fail condition on a figure of the report, repeatable: 'p99(send->deliver)<5ms', 'lost==0', 'throughput>=2000' (see above)")
	return cmd
}

// useWorkload loads the workload named into cfg, with its number of
// users and duration unless flags set them.
func useWorkload(cfg *loadtest.Config, name string, flags *pflag.FlagSet) error {
	spec, err := workload.Load(name)
	if err != nil {
		return err
	}
	cfg.Workload = spec
	if !flags.Changed("users") && spec.Users > 0 {
		cfg.Users = spec.Users
	}
	if !flags.Changed("duration") && spec.Duration > 0 {
		cfg.Duration = spec.Duration
	}
	return nil
}

// reportOut is where and how a run's report goes.
type reportOut struct {
	stdout, stderr     io.Writer
	gates              []loadtest.Threshold
	jsonPath, htmlPath string
}

// finish checks the thresholds against rep, writes it, and returns the
// exit status it calls for; err is the run's error. A nil rep means the
// run could not be carried out.
func (o reportOut) finish(rep *loadtest.Report, err error) error {
	if rep == nil {
		return err
	}
	if len(o.gates) > 0 {
		v, verr := loadtest.Evaluate(rep, o.gates)
		if verr != nil {
			fmt.Fprintln(o.stderr, "loadtest:", verr)
			return exitError{2}
		}
		rep.Verdict = v
	}
	if werr := rep.WriteTable(o.stdout); werr != nil {
		return werr
	}
	if o.jsonPath != "" {
		if werr := rep.WriteJSON(o.jsonPath); werr != nil {
			return werr
		}
	}
	if o.htmlPath != "" {
		if werr := rep.WriteHTML(o.htmlPath); werr != nil {
			return werr
		}
	}
	if err != nil {
		fmt.Fprintln(o.stderr, "loadtest:", err)
		return exitError{2}
	}
	if code := rep.ExitCode(); code != 0 {
		return exitError{code}
	}
	return nil
}

// defaultAgentAddr is where an agent listens unless told otherwise:
// loopback, since an agent has no authentication.
const defaultAgentAddr = "127.0.0.1:7070"

func newAgentCmd(stderr io.Writer) *cobra.Command {
	var (
		listen, secret, password string
		brokers                  []string
	)
	listen = defaultAgentAddr
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Serve chat runs to a coordinator (loadtest run chat --agents), one at a time",
		Long: `Serve chat runs to a coordinator: "loadtest run chat --agents HOST:PORT,..."
on another machine POSTs each agent its share of the run (its own users,
their share of --rate), the agent runs it against the broker and answers
with its report and the HDR histograms the coordinator merges. One run at
a time (a second coordinator is refused while one runs); each run is
logged on stderr. SIGINT or SIGTERM ends the run under way, whose
interrupted report still goes back, and stops the agent.

The token secret (--secret, default $CHATD_AUTH_SECRET) and the --plain
password are the agent's own: the coordinator never sends secrets. The
agent loads only the brokers --brokers names (by default, brokers on
loopback), since its tokens and password go to the broker a run names;
a run is at most 100,000 users and an hour. The agent has no
authentication or TLS of its own: anyone who reaches it can make it load
those brokers. It listens on loopback by default; give it an
address on a trusted network only (a private network, a VPN, a firewall
rule admitting the coordinator).`,
		Example: `  # two agents on this machine, then the coordinator
  CHATD_AUTH_SECRET=... loadtest agent --listen 127.0.0.1:7070 &
  CHATD_AUTH_SECRET=... loadtest agent --listen 127.0.0.1:7071 &
  loadtest run chat --agents 127.0.0.1:7070,127.0.0.1:7071 --users 200 --rate 2000 --duration 20s
  # on a load machine of a private network
  loadtest agent --listen 10.0.0.11:7070 --secret "$SECRET" --brokers 10.0.0.5:1883`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("secret") {
				secret = os.Getenv("CHATD_AUTH_SECRET")
			}
			log := slog.New(slog.NewTextHandler(stderr, nil))
			agent := loadtest.NewAgent(loadtest.AgentOptions{Secret: []byte(secret), Password: password, Brokers: brokers, Logger: log})
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("agent: %w", err)
			}
			srv := &http.Server{Handler: agent, ReadHeaderTimeout: 10 * time.Second}
			served := make(chan error, 1)
			go func() { served <- srv.Serve(ln) }()
			log.Info("agent listening", "addr", ln.Addr().String())
			if len(secret) == 0 {
				log.Warn("no token secret (--secret, CHATD_AUTH_SECRET): only --plain runs will work")
			}
			select {
			case err := <-served:
				return fmt.Errorf("agent: %w", err)
			case <-cmd.Context().Done():
			}
			log.Info("agent stopping")
			// The run under way ends and its /run answers; Shutdown waits for that.
			agent.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := srv.Shutdown(ctx); err != nil {
				return fmt.Errorf("agent: stop: %w", errors.Join(err, srv.Close()))
			}
			<-served
			log.Info("agent stopped")
			return nil
		},
	}
	f := cmd.Flags()
	flagVar(f.StringVar, &listen, "listen", "address to serve coordinators on, host:port; agents belong on a trusted network (no authentication)")
	flagVar(f.StringVar, &secret, "secret", "HS256 token secret of the agent's users (default $CHATD_AUTH_SECRET); never sent by the coordinator")
	flagVar(f.StringVar, &password, "password", "--plain runs: CONNECT password (\"\" sends none); never sent by the coordinator")
	flagVar(f.StringSliceVar, &brokers, "brokers", "the brokers (host:port, comma-separated) coordinators may have this agent load, and so receive its secret and password; none: brokers on loopback only")
	return cmd
}

// flagVar defines, with define (such as f.IntVar), the flag name storing
// its value in *p, with the value *p holds as its default.
func flagVar[T any](define func(p *T, name string, value T, usage string), p *T, name, usage string) {
	define(p, name, *p, usage)
}

// isTerminal reports whether w is a character device, where a redrawn
// progress bar makes sense; logs and pipes get plain lines.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
