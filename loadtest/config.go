package loadtest

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/chatd/chatd/loadtest/workload"
)

// Scenario names accepted by Run.
const (
	ScenarioChat    = "chat"
	ScenarioDrain   = "drain"
	ScenarioConnect = "connect"
	ScenarioFlaky   = "flaky"
	ScenarioCrash   = "crash"
	ScenarioRestart = "restart"
	// ScenarioWorkload plays a chat workload file (Config.Workload).
	ScenarioWorkload = "workload"
)

// Scenarios lists every scenario with a one-line description.
var Scenarios = []struct{ Name, Doc string }{
	{ScenarioChat, "N users send to random other users at --rate; every message must arrive once, in order (with --devices, at every device of its recipient, and its sent copy at the sender's other devices)"},
	{ScenarioDrain, "--messages queued for one offline user by --senders senders, then it connects and drains"},
	{ScenarioConnect, "ramp N idle persistent connections at --connect-rate, hold them --hold after the last one, measure connect latency and server memory per connection"},
	{ScenarioFlaky, "chat through a toxiproxy with latency, jitter, bandwidth limit and connection cuts"},
	{ScenarioCrash, "chat while the server started with --server-cmd (one node at a time, round robin, when given several) is SIGKILLed and restarted every --kill-every"},
	{ScenarioWorkload, "a chat app's day from --workload (a YAML file, or quiet-evening or new-year): users online in sessions, direct and group messages, read receipts, typing, presence, media uploads; figures per action"},
	{ScenarioRestart, "--messages queued for --recipients offline users by --senders senders, the server started with --server-cmd SIGKILLed and restarted: time until it accepts connections and delivers, then every message drained"},
}

// Config describes one load-test run. The zero value is not usable: start
// from DefaultConfig.
type Config struct {
	// Scenario is one of the Scenario* names.
	Scenario string
	// Broker is the MQTT URL to drive, tcp://, ws:// or tls://, or a
	// comma-separated list of them, one per cluster node, all of one scheme.
	Broker string
	// Secret signs the access tokens (ignored in Plain mode).
	Secret []byte
	// Plain drives any MQTT broker: no tokens, raw payloads, no envelope.
	Plain bool
	// Username is, in Plain mode, the CONNECT username, with %s replaced
	// by the user ID if it has one ("" sends none): brokers that check
	// passwords (EMQX, HiveMQ with an auth extension, Mosquitto with a
	// password file) get one account per user, or one for all.
	Username string
	// Password is, in Plain mode, the CONNECT password ("" sends none).
	Password string
	// Topic is the inbox topic template; %s is replaced by the user ID.
	Topic string
	// UserPrefix starts every simulated user ID.
	UserPrefix string
	// Users is the number of simulated users (chat, flaky, crash, connect).
	Users int
	// Devices is how many devices each user of the chat, flaky and crash
	// scenarios has, each its own connection: 1 (or 0) connects every
	// user with client ID {user}; N connects {user}/d0 ... {user}/d{N-1},
	// each message is sent from one of them (drawn with the seed) and
	// must reach every device of its recipient once, in order, and its
	// sent copy every other device of its sender once, in the order that
	// device sent them. At most MaxDevices; chatd only (not Plain).
	Devices int
	// Duration bounds the sending phase (and the whole drain and connect scenarios).
	Duration time.Duration
	// Grace is how long to wait at the end for deliveries still on their way.
	Grace time.Duration
	// Size is the message object size in bytes.
	Size int
	// Rate is the total send rate in messages per second; 0 sends as fast as flow control allows.
	Rate float64
	// Inflight caps each sender's unacknowledged publishes.
	Inflight int
	// Flooders is how many abusive clients publish as fast as they can beside the chat users.
	Flooders int
	// Keepalive is the MQTT keepalive the clients ask for.
	Keepalive time.Duration
	// ConnectTimeout bounds one connection attempt.
	ConnectTimeout time.Duration

	// Messages is how many messages the drain and restart scenarios queue.
	Messages int
	// Senders is how many users queue messages in the drain and restart scenarios.
	Senders int
	// Recipients is how many offline users the restart scenario queues
	// messages for, round robin; each one's share must fit the server's
	// per-user queue cap (chatd: queue.max_queue_messages).
	Recipients int

	// ConnectRate is the connect scenario's ramp in connections per second; 0 is as fast as possible.
	ConnectRate float64
	// Hold is how long the connect scenario keeps its connections open.
	Hold time.Duration
	// SourceIPs spreads connections over 127.0.0.1..127.0.0.N to get more local ports; 0 picks by --users.
	SourceIPs int

	// ServerPID is a server process on this machine to measure.
	ServerPID int
	// ServerCmds start (and at the end stop) the server: one command, or one
	// per Broker URL for a cluster, the Nth serving the Nth URL. The crash
	// scenario kills and restarts one of them at a time.
	ServerCmds []string
	// ServerLog receives the output of the servers started by ServerCmds;
	// with several, node N writes to ServerLog.N. Empty discards it.
	ServerLog string
	// KillEvery is the crash scenario's interval between SIGKILLs.
	KillEvery time.Duration

	// Latency is the flaky proxy's added latency per direction.
	Latency time.Duration
	// Jitter is the flaky proxy's latency jitter.
	Jitter time.Duration
	// Bandwidth is the flaky proxy's rate limit per connection and direction in KB/s; 0 is unlimited.
	Bandwidth int
	// CutEvery is the flaky scenario's interval between connection cuts; 0 disables cuts.
	CutEvery time.Duration
	// CutFor is how long a cut lasts.
	CutFor time.Duration
	// Cuts lists the kinds of cut to draw from: down, reset, stall.
	Cuts []string

	// Label names what sets the run apart beyond its scenario and rate
	// (say, "receipts on"); reports and comparisons show it.
	Label string

	// Seed makes recipient choice and cut order reproducible; 0 picks one.
	Seed int64

	// Workload is the workload scenario's chat workload (workload.Load).
	Workload *workload.Spec
	// API is chatd's HTTP API base URL, for the workload scenario's
	// groups and media uploads.
	API string
	// Speed runs the workload scenario's times (sessions, absences, think
	// times) this many times faster than its file says.
	Speed float64

	// Raw makes the report carry what it was computed from (Report.Raw):
	// the histograms MergeReports needs. Agents set it.
	Raw bool

	// Protocol is the MQTT version every simulated phone speaks: 3 for
	// 3.1.1, 5 for MQTT 5; 0 with a ProtocolMix (alone, 0 means 3).
	Protocol int
	// ProtocolMix, when not empty, gives each version a share of the
	// phones instead of Protocol, as "5:70,3:30" (percentages summing to
	// 100); phones get their version by their slot, evenly interleaved.
	ProtocolMix string
	// ReceiveMaximum is the Receive Maximum the MQTT 5 phones send in
	// CONNECT: how many QoS 1 deliveries the broker may have unacknowledged
	// at each; 0 sends none (the protocol's default, 65535).
	ReceiveMaximum int
}

// DefaultConfig returns the defaults of the command line.
func DefaultConfig() Config {
	return Config{
		Scenario:       ScenarioChat,
		Broker:         "tcp://127.0.0.1:1883",
		Topic:          "inbox/%s",
		UserPrefix:     "lt",
		Users:          100,
		Devices:        1,
		Duration:       30 * time.Second,
		Grace:          5 * time.Second,
		Size:           256,
		Inflight:       16,
		Keepalive:      10 * time.Second,
		ConnectTimeout: 10 * time.Second,
		Messages:       100_000,
		Senders:        4,
		Recipients:     100,
		ConnectRate:    500,
		Hold:           10 * time.Second,
		KillEvery:      5 * time.Second,
		Latency:        30 * time.Millisecond,
		Jitter:         20 * time.Millisecond,
		Bandwidth:      0,
		CutEvery:       2 * time.Second,
		CutFor:         500 * time.Millisecond,
		Cuts:           []string{cutDown, cutReset, cutStall},
		API:            "http://127.0.0.1:8080",
		Speed:          1,
		Protocol:       protocol3,
	}
}

// Validate reports the first setting that cannot work.
func (c *Config) Validate() error {
	known := false
	for _, s := range Scenarios {
		known = known || s.Name == c.Scenario
	}
	if !known {
		return fmt.Errorf("unknown scenario %q", c.Scenario)
	}
	urls, err := c.brokerURLs()
	if err != nil {
		return err
	}
	if strings.Count(c.Topic, "%s") != 1 {
		return fmt.Errorf("topic %q: must contain %%s exactly once", c.Topic)
	}
	if !c.Plain && (c.Username != "" || c.Password != "") {
		return errors.New("--username and --password are for --plain: chatd's clients sign in with tokens")
	}
	if strings.Count(c.Username, "%s") > 1 {
		return fmt.Errorf("username %q: at most one %%s", c.Username)
	}
	if !c.Plain && len(c.Secret) == 0 {
		return errors.New("no token secret: set --secret or CHATD_AUTH_SECRET, or use --plain")
	}
	if strings.ContainsAny(c.Label, "|\n") {
		return errors.New("--label: no | or newline (it goes into Markdown tables)")
	}
	if !validUserID(c.UserPrefix + "0") {
		return fmt.Errorf("user prefix %q: user IDs are 1-64 characters of [A-Za-z0-9_.-]", c.UserPrefix)
	}
	type positive struct {
		name string
		ok   bool
	}
	checks := []positive{
		{"--duration", c.Duration > 0},
		{"--grace", c.Grace >= 0},
		{"--size", c.Size > 0},
		{"--rate", c.Rate >= 0},
		{"--inflight", c.Inflight > 0 && c.Inflight <= 65535},
		{"--keepalive", c.Keepalive >= time.Second},
		{"--connect-timeout", c.ConnectTimeout > 0},
		{"--connect-rate", c.ConnectRate >= 0},
		{"--source-ips", c.SourceIPs >= 0 && c.SourceIPs <= 254},
		{"--hold", c.Hold >= 0},
		{"--flooders", c.Flooders >= 0},
		{fmt.Sprintf("--devices (1 to %d)", MaxDevices), c.Devices >= 0 && c.Devices <= MaxDevices},
	}
	switch c.Scenario {
	case ScenarioDrain:
		checks = append(checks, positive{"--messages", c.Messages > 0}, positive{"--senders", c.Senders > 0})
	case ScenarioRestart:
		checks = append(checks,
			positive{"--messages", c.Messages > 0},
			positive{"--senders", c.Senders > 0},
			positive{"--recipients (1 to --messages)", c.Recipients > 0 && c.Recipients <= c.Messages},
			positive{"--server-cmd (the restart scenario starts, kills and restarts one server)", len(c.ServerCmds) == 1},
			positive{"--broker (the restart scenario drives one server: one URL)", len(urls) == 1})
	default:
		checks = append(checks, positive{"--users", c.Users > 0})
	}
	switch c.Scenario {
	case ScenarioChat, ScenarioFlaky, ScenarioCrash:
		checks = append(checks, positive{"--users (at least 2 to chat)", c.Users >= 2})
	default:
		checks = append(checks, positive{"--devices (only the chat, flaky and crash scenarios give users several devices)", c.Devices <= 1})
	}
	if c.Plain {
		checks = append(checks, positive{"--devices (sent copies are chatd's: not with --plain)", c.Devices <= 1})
	}
	if c.Scenario == ScenarioFlaky {
		checks = append(checks,
			positive{"--latency", c.Latency >= 0},
			positive{"--jitter", c.Jitter >= 0},
			positive{"--bandwidth", c.Bandwidth >= 0},
			positive{"--cut-every", c.CutEvery >= 0},
			positive{"--cut-for", c.CutFor > 0 || c.CutEvery == 0},
			positive{"--cuts", c.CutEvery == 0 || len(c.Cuts) > 0})
		for _, k := range c.Cuts {
			if k != cutDown && k != cutReset && k != cutStall {
				return fmt.Errorf("--cuts: %q is not one of down, reset, stall", k)
			}
		}
	}
	if c.Scenario == ScenarioWorkload {
		if err := c.validateWorkload(); err != nil {
			return err
		}
	}
	if c.Scenario == ScenarioCrash {
		checks = append(checks,
			positive{"--server-cmd (the crash scenario starts and kills the server)", len(c.ServerCmds) > 0},
			positive{"--kill-every", c.KillEvery > 0})
	}
	for _, p := range checks {
		if !p.ok {
			return fmt.Errorf("%s: invalid value", p.name)
		}
	}
	if len(c.ServerCmds) > 0 && c.ServerPID != 0 {
		return errors.New("--server-cmd and --server-pid are exclusive")
	}
	for _, cmd := range c.ServerCmds {
		if len(strings.Fields(cmd)) == 0 {
			return errors.New("--server-cmd: empty command")
		}
	}
	// Each node's command is matched with its URL, which tells when the
	// node accepts connections again after a restart.
	if len(c.ServerCmds) > 1 && len(c.ServerCmds) != len(urls) {
		return fmt.Errorf("--server-cmd given %d times for %d --broker URLs: give one command, or one per URL",
			len(c.ServerCmds), len(urls))
	}
	if err := c.validateProtocol(); err != nil {
		return err
	}
	if c.Scenario == ScenarioFlaky && len(urls) > 1 {
		return errors.New("--broker: the flaky scenario's fault proxy fronts a single broker URL")
	}
	return nil
}

// validateWorkload checks the settings of the workload scenario.
func (c *Config) validateWorkload() error {
	switch {
	case c.Workload == nil:
		return errors.New("--workload: the workload scenario needs one (a YAML file, or quiet-evening or new-year)")
	case c.Plain:
		return errors.New("--plain: the workload scenario speaks chatd's protocol (groups, receipts, presence)")
	case !(c.Speed > 0):
		return errors.New("--speed: must be above 0")
	case c.Workload.Contacts < 1:
		return errors.New("--workload: contacts must be at least 1")
	case c.Protocol == protocol5 || c.ProtocolMix != "" || c.ReceiveMaximum != 0:
		return errors.New("--protocol, --protocol-mix, --receive-maximum: the workload scenario's users speak MQTT 3.1.1")
	}
	if c.Workload.Uses(workload.Group) || c.Workload.Uses(workload.Media) {
		u, err := url.Parse(c.API)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("--api %q: chatd's HTTP API as http(s)://host:port, for the workload's groups and media", c.API)
		}
	}
	return nil
}

// brokerURLs splits Broker into its URLs and checks each: a known scheme,
// a host, no duplicate, and one scheme for all, since the direct TCP dial
// that clientOptions installs applies to every URL of a client.
func (c *Config) brokerURLs() ([]string, error) {
	var urls []string
	seen := make(map[string]bool)
	scheme := ""
	for _, raw := range strings.Split(c.Broker, ",") {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			return nil, fmt.Errorf("broker %q: empty URL in the list", c.Broker)
		}
		u, err := url.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("broker %q: %w", raw, err)
		}
		switch u.Scheme {
		case "tcp", "mqtt", "ws", "wss", "tls", "ssl", "mqtts":
		default:
			return nil, fmt.Errorf("broker %q: scheme must be tcp, ws, wss or tls", raw)
		}
		if u.Host == "" {
			return nil, fmt.Errorf("broker %q: no host:port", raw)
		}
		if scheme != "" && u.Scheme != scheme {
			return nil, fmt.Errorf("broker %q: every URL of the list must use one scheme (%s)", raw, scheme)
		}
		scheme = u.Scheme
		if seen[raw] {
			return nil, fmt.Errorf("broker %q: listed twice", raw)
		}
		seen[raw] = true
		urls = append(urls, raw)
	}
	return urls, nil
}

// Protocol versions a phone may speak.
const (
	protocol3 = 3 // MQTT 3.1.1
	protocol5 = 5 // MQTT 5
)

// protocolShare is one version's share of a protocol mix.
type protocolShare struct {
	version int
	percent int
}

// parseProtocolMix reads a mix such as "5:70,3:30": each version once,
// each share 1-100, summing to 100.
func parseProtocolMix(s string) ([]protocolShare, error) {
	var mix []protocolShare
	total := 0
	for _, part := range strings.Split(s, ",") {
		v, pct, ok := strings.Cut(strings.TrimSpace(part), ":")
		if !ok {
			return nil, fmt.Errorf("--protocol-mix %q: %q is not VERSION:PERCENT, e.g. 5:70", s, part)
		}
		version, err := parseProtocol(v)
		if err != nil {
			return nil, fmt.Errorf("--protocol-mix %q: %w", s, err)
		}
		n, err := strconv.Atoi(strings.TrimSpace(pct))
		if err != nil || n < 1 || n > 100 {
			return nil, fmt.Errorf("--protocol-mix %q: share %q: want a whole percentage, 1 to 100", s, pct)
		}
		for _, m := range mix {
			if m.version == version {
				return nil, fmt.Errorf("--protocol-mix %q: version %d given twice", s, version)
			}
		}
		mix = append(mix, protocolShare{version: version, percent: n})
		total += n
	}
	if total != 100 {
		return nil, fmt.Errorf("--protocol-mix %q: shares sum to %d, want 100", s, total)
	}
	return mix, nil
}

// parseProtocol reads a protocol version: 3 (MQTT 3.1.1) or 5.
func parseProtocol(s string) (int, error) {
	switch strings.TrimSpace(s) {
	case "3", "3.1.1":
		return protocol3, nil
	case "5":
		return protocol5, nil
	}
	return 0, fmt.Errorf("protocol %q: want 3 (MQTT 3.1.1) or 5", s)
}

// validateProtocol checks Protocol, ProtocolMix and ReceiveMaximum
// against each other.
func (c *Config) validateProtocol() error {
	if c.Protocol != 0 && c.Protocol != protocol3 && c.Protocol != protocol5 {
		return fmt.Errorf("--protocol %d: want 3 (MQTT 3.1.1) or 5", c.Protocol)
	}
	v5 := c.Protocol == protocol5
	if c.ProtocolMix != "" {
		if c.Protocol != 0 {
			return errors.New("--protocol and --protocol-mix are exclusive (Config.Protocol must be 0 with a ProtocolMix)")
		}
		mix, err := parseProtocolMix(c.ProtocolMix)
		if err != nil {
			return err
		}
		for _, m := range mix {
			v5 = v5 || m.version == protocol5
		}
	}
	if c.ReceiveMaximum < 0 || c.ReceiveMaximum > 65535 {
		return fmt.Errorf("--receive-maximum %d: want 1 to 65535, or 0 to send none", c.ReceiveMaximum)
	}
	if c.ReceiveMaximum != 0 && !v5 {
		return errors.New("--receive-maximum is an MQTT 5 setting: add --protocol 5 or a --protocol-mix with 5")
	}
	return nil
}

// validUserID reports whether s is a user ID of PROTOCOL.md section 1.
func validUserID(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}
