package loadtest

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// maxLostSamples is how many lost messages a report names.
const maxLostSamples = 20

// Report is everything one run measured.
type Report struct {
	// Scenario is the scenario run.
	Scenario string `json:"scenario"`
	// Broker is the broker URL driven, or the comma-separated URLs of a cluster's nodes.
	Broker string `json:"broker"`
	// Plain says the broker was driven without tokens or envelopes.
	Plain bool `json:"plain"`
	// RunTag prefixes every message id of the run.
	RunTag string `json:"run_tag"`
	// Started is when the run began.
	Started time.Time `json:"started"`
	// ElapsedSec is the whole run's wall time.
	ElapsedSec float64 `json:"elapsed_s"`
	// Interrupted says the run was cut short (Ctrl-C): losses may be overstated.
	Interrupted bool `json:"interrupted"`
	// Settings is the configuration that matters to the numbers.
	Settings Settings `json:"settings"`
	// Host describes the machine the load tester ran on.
	Host Host `json:"host"`
	// Counts is the message accounting.
	Counts Counts `json:"counts"`
	// LostSamples names some lost messages as "id from->to".
	LostSamples []string `json:"lost_samples,omitempty"`
	// RefusalCodes counts error events by code.
	RefusalCodes map[string]int64 `json:"refusal_codes,omitempty"`
	// ReasonCodes counts the MQTT 5 reason codes the broker answered the
	// phones with, by packet and code, sorted: every code but success in
	// CONNACK and PUBACK (0x10 no matching subscribers included), SUBACK
	// failures, and every server DISCONNECT.
	ReasonCodes []ReasonCount `json:"reason_codes,omitempty"`
	// Protocols tells how many phones spoke each MQTT version.
	Protocols ProtocolStats `json:"protocols"`
	// Throughput is first deliveries per second from the first send to the
	// last delivery; with several devices per user, first deliveries to
	// each device (sent copies not included).
	Throughput float64 `json:"throughput_per_s"`
	// SendRate is messages sent per second of the sending phase.
	SendRate float64 `json:"send_rate_per_s"`
	// Deliver is the send->deliver latency of first deliveries.
	Deliver Percentiles `json:"deliver_latency"`
	// Ack is the send->PUBACK latency.
	Ack Percentiles `json:"ack_latency"`
	// Receipt is the send->delivered-receipt latency (chatd only).
	Receipt Percentiles `json:"receipt_latency"`
	// Copy is the send->sent-copy latency of first receptions by the
	// sender's other devices, when users have several.
	Copy Percentiles `json:"copy_latency,omitzero"`
	// LatencyBins is the send->deliver latency histogram.
	LatencyBins []Bin `json:"latency_bins,omitempty"`
	// Connections summarises the clients' connections.
	Connections Connections `json:"connections"`
	// Series is the per-second time series.
	Series []Point `json:"series"`
	// Server is the server's resource use, when it runs on this machine.
	Server *ProcUsage `json:"server,omitempty"`
	// Client is the load tester's own resource use; merged from agents,
	// every figure summed over them (each agent's is in Agents).
	Client ProcUsage `json:"client"`
	// Drain is the drain scenario's result.
	Drain *DrainResult `json:"drain,omitempty"`
	// Connect is the connect scenario's result.
	Connect *ConnectResult `json:"connect,omitempty"`
	// Faults is the flaky scenario's faults.
	Faults *FaultResult `json:"faults,omitempty"`
	// Crash is the crash scenario's kills.
	Crash *CrashResult `json:"crash,omitempty"`
	// Restart is the restart scenario's result.
	Restart *RestartResult `json:"restart,omitempty"`
	// Workload is the workload scenario's figures per action.
	Workload *WorkloadResult `json:"workload,omitempty"`
	// Verdict is the --threshold conditions checked, when any were given.
	Verdict *Verdict `json:"verdict,omitempty"`
	// Flood is what the abusive clients of --flooders did.
	Flood *FloodResult `json:"flood,omitempty"`
	// ErrorCount is every error met.
	ErrorCount int64 `json:"error_count"`
	// Errors holds the first error messages.
	Errors []string `json:"errors,omitempty"`
	// Agents is each agent's share, in a report merged from agents.
	Agents []AgentSummary `json:"agents,omitempty"`
	// Raw is what the report was computed from, when Config.Raw asked for
	// it: what MergeReports merges.
	Raw *RawData `json:"raw,omitempty"`
}

// Settings is the part of the configuration a reader needs to compare runs.
type Settings struct {
	// Users is the simulated users.
	Users int `json:"users"`
	// Devices is each user's devices in the chat, flaky and crash scenarios.
	Devices int `json:"devices,omitempty"`
	// Seed is the seed of the run's random choices in the chat, flaky and
	// crash scenarios: --seed repeats them.
	Seed int64 `json:"seed,omitempty"`
	// Size is the message object size in bytes.
	Size int `json:"size"`
	// Rate is the target send rate, 0 for as fast as flow control allows.
	Rate float64 `json:"rate"`
	// Inflight is each sender's window of unacknowledged publishes.
	Inflight int `json:"inflight"`
	// DurationSec is the sending phase's length.
	DurationSec float64 `json:"duration_s"`
	// GraceSec is the drain grace period.
	GraceSec float64 `json:"grace_s"`
	// Messages is the messages the drain and restart scenarios queue.
	Messages int `json:"messages,omitempty"`
	// Senders is the drain and restart scenarios' senders.
	Senders int `json:"senders,omitempty"`
	// Recipients is the restart scenario's offline users.
	Recipients int `json:"recipients,omitempty"`
	// ConnectRate is the connect scenario's ramp rate.
	ConnectRate float64 `json:"connect_rate,omitempty"`
	// HoldSec is the connect scenario's hold.
	HoldSec float64 `json:"hold_s,omitempty"`
	// KillEverySec is the crash scenario's kill interval.
	KillEverySec float64 `json:"kill_every_s,omitempty"`
	// Label names what sets the run apart beyond its scenario and rate, when given.
	Label string `json:"label,omitempty"`
	// ServerCmd is the command that started the server, when there was one.
	ServerCmd string `json:"server_cmd,omitempty"`
	// ServerCmds are the commands that started the nodes, when there were several.
	ServerCmds []string `json:"server_cmds,omitempty"`
	// Agents are the agents that ran the users, in a report merged from
	// agents (Users and Rate are then their totals).
	Agents []string `json:"agents,omitempty"`
}

// Connections summarises the clients' connections.
type Connections struct {
	// Clients is the simulated phones.
	Clients int `json:"clients"`
	// Reconnects is the automatic reconnections.
	Reconnects int64 `json:"reconnects"`
	// Lost is the connections lost.
	Lost int64 `json:"lost"`
	// SessionsLost is the MQTT 5 reconnections whose CONNACK said the
	// broker had no session for the phone (Session Present 0), which
	// makes a client drop the publishes it has not had acknowledged; the
	// load tester publishes those again itself.
	SessionsLost int64 `json:"sessions_lost"`
	// LossReasons holds the first reasons given for lost connections.
	LossReasons []string `json:"loss_reasons,omitempty"`
	// Connack is the CONNECT->CONNACK latency of first connections.
	Connack Percentiles `json:"connack_latency"`
	// Suback is the CONNECT->SUBACK latency of first connections.
	Suback Percentiles `json:"suback_latency"`
	// Nodes counts the connections per broker URL, when there were several.
	Nodes []NodeConnections `json:"nodes,omitempty"`
}

// NodeConnections counts the clients' connections to one broker URL.
type NodeConnections struct {
	// URL is the node's broker URL.
	URL string `json:"url"`
	// Clients is the clients whose first connection was to this node.
	Clients int64 `json:"clients"`
	// Connects is every connection to this node, reconnections included.
	Connects int64 `json:"connects"`
	// AtClose is the clients connected to this node when the run closed them.
	AtClose int64 `json:"at_close"`
}

func (r *run) report(interrupted bool) *Report {
	counts, lost := r.ledger.Final(maxLostSamples)
	deliver, ack, receipt := r.ledger.Histograms()
	rep := &Report{
		Scenario:     r.cfg.Scenario,
		Broker:       r.cfg.Broker,
		Plain:        r.cfg.Plain,
		RunTag:       r.tag,
		Started:      r.start,
		ElapsedSec:   time.Since(r.start).Seconds(),
		Interrupted:  interrupted,
		Settings:     r.settings(),
		Host:         hostInfo(),
		Counts:       counts,
		LostSamples:  lost,
		RefusalCodes: r.ledger.RefusalCodes(),
		Deliver:      PercentilesOf(deliver),
		Ack:          PercentilesOf(ack),
		Receipt:      PercentilesOf(receipt),
		Copy:         PercentilesOf(r.ledger.CopyHistogram()),
		LatencyBins:  LogBins(deliver),
		Client:       r.self.usage(),
		Drain:        r.drain,
		Connect:      r.connect,
		Faults:       r.faults,
		Crash:        r.crash,
		Restart:      r.restart,
		Flood:        r.flood,
	}
	if len(rep.RefusalCodes) == 0 {
		rep.RefusalCodes = nil
	}
	rep.ReasonCodes = r.reasons.list()
	rep.Protocols = ProtocolStats{
		MQTT311:        r.protos.v3.Load(),
		MQTT5:          r.protos.v5.Load(),
		ReceiveMaximum: r.cfg.ReceiveMaximum,
		GrantedMin:     int(r.protos.grantedMin.Load()),
		GrantedMax:     int(r.protos.grantedMax.Load()),
	}
	if first, last := r.ledger.FirstSend(), r.lastDelivery(); first > 0 && last > first {
		rep.Throughput = float64(counts.Unique) / (float64(last-first) / 1e9)
	}
	switch r.cfg.Scenario {
	case ScenarioChat, ScenarioFlaky, ScenarioCrash:
		rep.SendRate = float64(counts.Sent) / r.cfg.Duration.Seconds()
	}
	r.latMu.Lock()
	rep.Connections = Connections{
		Clients:      int(r.connectH.TotalCount()),
		Reconnects:   r.conns.reconnects.Load(),
		SessionsLost: r.conns.sessionsLost.Load(),
		Lost:         r.conns.lost.Load(),
		Connack:      PercentilesOf(r.connectH),
		Suback:       PercentilesOf(r.subscribeH),
	}
	r.latMu.Unlock()
	if len(r.brokers) > 1 {
		for i, b := range r.brokers {
			n := &r.nodes[i]
			rep.Connections.Nodes = append(rep.Connections.Nodes, NodeConnections{
				URL:      b,
				Clients:  n.clients.Load(),
				Connects: n.connects.Load(),
				AtClose:  n.atClose.Load(),
			})
		}
	}
	r.conns.mu.Lock()
	rep.Connections.LossReasons = append([]string(nil), r.conns.reasons...)
	r.conns.mu.Unlock()
	if r.watch != nil {
		u := r.watch.usage()
		rep.Server = &u
	}
	r.seriesMu.Lock()
	rep.Series = append([]Point(nil), r.series...)
	r.seriesMu.Unlock()
	if r.cfg.Raw {
		raw, err := r.rawData(deliver, ack, receipt)
		if err != nil {
			r.errs.add(err)
		}
		rep.Raw = raw
	}
	if r.book != nil {
		r.workloadReport(rep)
	}
	rep.ErrorCount, rep.Errors = r.errs.snapshot()
	return rep
}

func (r *run) lastDelivery() int64 {
	_, last := r.ledger.DeliveryWindow()
	return last
}

func (r *run) settings() Settings {
	c := r.cfg
	s := Settings{
		Users:       len(r.users),
		Size:        c.Size,
		Rate:        c.Rate,
		Inflight:    c.Inflight,
		DurationSec: c.Duration.Seconds(),
		GraceSec:    c.Grace.Seconds(),
		Label:       c.Label,
	}
	switch len(c.ServerCmds) {
	case 0:
	case 1:
		s.ServerCmd = c.ServerCmds[0]
	default:
		s.ServerCmds = c.ServerCmds
	}
	switch c.Scenario {
	case ScenarioDrain:
		s.Messages, s.Senders = c.Messages, c.Senders
	case ScenarioRestart:
		s.Messages, s.Senders, s.Recipients = c.Messages, c.Senders, c.Recipients
	case ScenarioConnect:
		s.ConnectRate, s.HoldSec = c.ConnectRate, c.Hold.Seconds()
	case ScenarioCrash:
		s.KillEverySec = c.KillEvery.Seconds()
	}
	switch c.Scenario {
	case ScenarioChat, ScenarioFlaky, ScenarioCrash:
		s.Devices, s.Seed = r.devices, int64(r.seed())
	case ScenarioWorkload:
		s.Seed = int64(r.seed())
	}
	return s
}

// devices returns each user's devices, 1 for a report that does not say.
func (rep *Report) devices() int { return max(1, rep.Settings.Devices) }

// settingsLine describes the settings that matter to the scenario.
func (rep *Report) settingsLine() string {
	s := rep.Settings
	switch rep.Scenario {
	case ScenarioConnect:
		rate := "unlimited"
		if s.ConnectRate > 0 {
			rate = fmt.Sprintf("%.0f/s", s.ConnectRate)
		}
		return fmt.Sprintf("users %d  connect rate %s  hold %.1fs", s.Users, rate, s.HoldSec) + rep.protocolSettings()
	case ScenarioDrain:
		return fmt.Sprintf("messages %d  senders %d  size %d B  inflight %d  bound %.0fs  grace %.0fs",
			s.Messages, s.Senders, s.Size, s.Inflight, s.DurationSec, s.GraceSec) + rep.protocolSettings()
	case ScenarioWorkload:
		return fmt.Sprintf("users %d  duration %.0fs  grace %.0fs  seed %d", s.Users, s.DurationSec, s.GraceSec, s.Seed)
	case ScenarioRestart:
		return fmt.Sprintf("messages %d  recipients %d  senders %d  size %d B  inflight %d  bound %.0fs  grace %.0fs",
			s.Messages, s.Recipients, s.Senders, s.Size, s.Inflight, s.DurationSec, s.GraceSec) + rep.protocolSettings()
	}
	rate := "max"
	if s.Rate > 0 {
		rate = fmt.Sprintf("%.0f/s", s.Rate)
	}
	line := fmt.Sprintf("users %d  size %d B  rate %s  inflight %d  duration %.0fs  grace %.0fs",
		s.Users, s.Size, rate, s.Inflight, s.DurationSec, s.GraceSec)
	if s.Devices > 1 {
		line += fmt.Sprintf("  devices %d", s.Devices)
	}
	if s.KillEverySec > 0 {
		line += fmt.Sprintf("  kill every %.1fs", s.KillEverySec)
	}
	if s.Seed != 0 {
		line += fmt.Sprintf("  seed %d", s.Seed)
	}
	return line + rep.protocolSettings()
}

// protocolSettings describes the MQTT versions the phones spoke, when
// any spoke MQTT 5: "" for an MQTT 3.1.1 run, as before there was a choice.
func (rep *Report) protocolSettings() string {
	p := rep.Protocols
	if p.MQTT5 == 0 {
		return ""
	}
	line := fmt.Sprintf("  MQTT 5: %d clients", p.MQTT5)
	if p.MQTT311 > 0 {
		line += fmt.Sprintf(", MQTT 3.1.1: %d", p.MQTT311)
	}
	if p.ReceiveMaximum > 0 {
		line += fmt.Sprintf(", receive maximum %d", p.ReceiveMaximum)
	}
	switch {
	case p.GrantedMin == p.GrantedMax:
		line += fmt.Sprintf(", granted %d", p.GrantedMin)
	default:
		line += fmt.Sprintf(", granted %d-%d", p.GrantedMin, p.GrantedMax)
	}
	return line
}

// Failures lists why the run failed; it is empty when the run passed.
func (rep *Report) Failures() []string {
	f := rep.promiseFailures()
	if rep.Verdict != nil {
		for _, r := range rep.Verdict.Failed() {
			f = append(f, fmt.Sprintf("threshold %s failed (%s was %s)", r.Expr, r.Figure, formatFigure(r.Actual)))
		}
	}
	return f
}

// formatFigure writes a report figure to three decimals at most, without
// needless zeros.
func formatFigure(v float64) string { return strconv.FormatFloat(math.Round(v*1000)/1000, 'f', -1, 64) }

// promiseFailures is Failures without the thresholds: what the broker
// and the run itself did wrong.
func (rep *Report) promiseFailures() []string {
	var f []string
	c := rep.Counts
	add := func(n int64, what string) {
		if n > 0 {
			f = append(f, fmt.Sprintf("%d %s", n, what))
		}
	}
	if rep.devices() > 1 {
		add(c.Lost, "deliveries lost (PUBACKed, never delivered to a device of the recipient)")
	} else {
		add(c.Lost, "messages lost (PUBACKed, never delivered)")
	}
	add(c.Misrouted, "deliveries misrouted")
	add(c.OrderViolations, "order violations")
	add(c.CopiesLost, "sent copies lost (never received by a device of the sender)")
	add(c.CopiesMisrouted, "sent copies misrouted")
	add(c.CopyOrderViolations, "sent copy order violations")
	add(c.SendFailed, "publishes failed")
	add(c.Refused, "messages refused by the broker")
	add(c.Malformed, "malformed deliveries")
	add(rep.ErrorCount, "errors")
	if rep.Interrupted {
		f = append(f, "interrupted before the grace period ended")
	}
	return f
}

// ExitCode is the process exit status the report calls for: 0 when the
// run passed, 1 when messages or sent copies were lost, misrouted or
// reordered (the broker broke its promise), 2 for any other error, and for
// an interrupted run, whose losses are unknown, and 3 when the run kept
// every promise but a --threshold failed.
func (rep *Report) ExitCode() int {
	c := rep.Counts
	switch {
	case rep.Interrupted:
		return 2
	case c.Lost > 0 || c.Misrouted > 0 || c.OrderViolations > 0,
		c.CopiesLost > 0 || c.CopiesMisrouted > 0 || c.CopyOrderViolations > 0:
		return 1
	case len(rep.promiseFailures()) > 0:
		return 2
	case rep.Verdict != nil && !rep.Verdict.Passed:
		return 3
	default:
		return 0
	}
}

// WriteJSON writes the report as indented JSON to path.
func (rep *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("encode report: %w", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// WriteTable writes the human summary of the report.
func (rep *Report) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	p := func(format string, a ...any) { fmt.Fprintf(tw, format+"\n", a...) }
	mode := "chatd"
	if rep.Plain {
		mode = "plain MQTT"
	}
	if rep.Settings.Label != "" {
		mode += ", " + rep.Settings.Label
	}
	p("%s against %s (%s), run %s, %.1f s", rep.Scenario, rep.Broker, mode, rep.RunTag, rep.ElapsedSec)
	p("%s", rep.settingsLine())
	p("")
	c := rep.Counts
	devices := rep.devices()
	if c.Sent > 0 || rep.Scenario != ScenarioConnect {
		if devices > 1 {
			p("messages\t\t(each owed once to every one of its recipient's %d devices)", devices)
		} else {
			p("messages")
		}
		p("  sent\t%d", c.Sent)
		p("  PUBACKed\t%d", c.Acked)
		p("  delivered\t%d\t(unique %d, duplicates %d)", c.Delivered, c.Unique, c.Duplicates)
		p("  lost\t%d\t(PUBACKed, not delivered after the grace period)", c.Lost)
		p("  in flight at stop\t%d\t(neither PUBACKed nor delivered)", c.InFlight)
		p("  order violations\t%d", c.OrderViolations)
	}
	if c.Refused+c.SendFailed+c.Misrouted+c.Foreign+c.Malformed > 0 {
		p("  refused\t%d\t%s", c.Refused, codes(rep.RefusalCodes))
		p("  send failures\t%d", c.SendFailed)
		p("  misrouted\t%d", c.Misrouted)
		p("  foreign\t%d\t(not sent by this run)", c.Foreign)
		p("  malformed\t%d", c.Malformed)
	}
	if c.Receipts+c.ErrorEvents+c.Other > 0 {
		p("  events\treceipts %d, errors %d, other %d", c.Receipts, c.ErrorEvents, c.Other)
	}
	if len(rep.ReasonCodes) > 0 {
		p("MQTT 5 reason codes\t\t(what the broker answered other than success)")
		for _, rc := range rep.ReasonCodes {
			p("  %s %s\t%d\t%s", rc.Packet, rc.Hex(), rc.Count, rc.Name)
		}
	}
	if devices > 1 || c.CopiesExpected+c.CopiesReceived+c.CopyDuplicates+c.CopiesMisrouted > 0 {
		p("sent copies\t\t(each owed once to every other device of its sender, in the order it sent them)")
		p("  expected\t%d", c.CopiesExpected)
		p("  received\t%d\t(duplicates %d)", c.CopiesReceived, c.CopyDuplicates)
		p("  lost\t%d", c.CopiesLost)
		p("  order violations\t%d", c.CopyOrderViolations)
		p("  misrouted\t%d", c.CopiesMisrouted)
	}
	perDevice := ""
	if devices > 1 {
		perDevice = " to devices"
	}
	switch {
	case rep.Throughput > 0 && rep.SendRate > 0:
		p("throughput\t%.0f msg/s delivered%s\t(sent %.0f/s)", rep.Throughput, perDevice, rep.SendRate)
	case rep.Throughput > 0:
		p("throughput\t%.0f msg/s delivered%s", rep.Throughput, perDevice)
	}
	p("")
	p("latency (ms)\tp50\tp90\tp99\tp99.9\tmax\tcount")
	row := func(name string, q Percentiles) {
		if q.Count > 0 {
			p("  %s\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%d", name, q.P50, q.P90, q.P99, q.P999, q.Max, q.Count)
		}
	}
	row("send->deliver", rep.Deliver)
	row("send->PUBACK", rep.Ack)
	row("send->receipt", rep.Receipt)
	row("send->sent copy", rep.Copy)
	row("CONNECT->CONNACK", rep.Connections.Connack)
	row("CONNECT->SUBACK", rep.Connections.Suback)
	p("")
	cn := rep.Connections
	p("connections\t%d clients, %d reconnects, %d lost", cn.Clients, cn.Reconnects, cn.Lost)
	if cn.SessionsLost > 0 {
		p("  sessions lost\t%d MQTT 5 reconnections answered with Session Present 0: a client that follows the spec drops its unacknowledged publishes", cn.SessionsLost)
	}
	for i, n := range cn.Nodes {
		p("  node %d\t%s: %d clients, %d connections, %d at close", i+1, n.URL, n.Clients, n.Connects, n.AtClose)
	}
	if d := rep.Drain; d != nil {
		p("drain\tqueued %d in %.2f s (%.0f/s); drained in %.2f s (%.0f/s), first after %.1f ms; complete %v",
			d.Queued, d.QueueSec, d.QueueRate, d.DrainSec, d.DrainRate, d.FirstMs, d.Complete)
	}
	if k := rep.Connect; k != nil {
		p("connect\t%d of %d connected (%d failed) in %.2f s over %d source IPs, held %.1f s",
			k.Connected, k.Target, k.Failed, k.RampSec, k.SourceIPs, k.HoldSec)
		if k.RSSPerConnKB != 0 {
			p("  server memory\t%.1f MB -> %.1f MB: %.1f KiB per connection, settled %.0f s",
				k.ServerRSSBeforeMB, k.ServerRSSHeldMB, k.RSSPerConnKB, k.SettledSec)
		}
	}
	if k := rep.Workload; k != nil {
		p("")
		writeWorkload(tw, k)
		p("")
	}
	if k := rep.Restart; k != nil {
		p("restart\tqueued %d for %d offline users in %.1f s (%.0f/s), then SIGKILL",
			k.Queued, k.Recipients, k.QueueSec, k.QueueRate)
		p("  new process\taccepting connections after %.2f s, first CONNACK after %.2f s, first queued message after %.2f s",
			k.ReadySec, k.ConnackSec, k.FirstDeliverySec)
		p("  drain\t%d delivered in %.1f s (%.0f/s); complete %v", k.Delivered, k.DrainSec, k.DrainRate, k.Complete)
	}
	if f := rep.Faults; f != nil {
		p("faults\tlatency %d ms ± %d ms, bandwidth %s, cuts %s",
			f.LatencyMs, f.JitterMs, kbps(f.BandwidthKBs), cuts(f.Cuts))
	}
	if f := rep.Flood; f != nil {
		p("flood\t%d abusive clients: %d publishes, %d answered (%.0f/s)", f.Clients, f.Sent, f.Acked, f.Rate)
	}
	if k := rep.Crash; k != nil {
		p("crash\t%d kills, restart %s ms, clients back %s ms", k.Kills, floats(k.RestartMs), resumes(k.ResumeMs))
		// With several nodes, say which went down and whose clients moved.
		for i, node := range k.Nodes {
			switch {
			case i >= len(k.RestartMs) || i >= len(k.Clients) || i >= len(k.ResumeMs):
			case k.Clients[i] == 0:
				p("  kill %d\tnode %d: restart %.0f ms; no client was on it", i+1, node, k.RestartMs[i])
			default:
				p("  kill %d\tnode %d: restart %.0f ms; its %d clients back after %s ms", i+1, node, k.RestartMs[i], k.Clients[i], resumes(k.ResumeMs[i:i+1]))
			}
		}
	}
	if s := rep.Server; s != nil {
		p("server\tpid %d: cpu %.1f s (%.0f%% of a core), rss %.1f -> %.1f MB (peak %.1f)",
			s.PID, s.CPUSeconds, s.AvgCPUPercent, s.StartRSSMB, s.EndRSSMB, s.PeakRSSMB)
	}
	if len(rep.Agents) > 0 {
		p("load testers\t%d agents: cpu %.1f s (%.0f%% of a core), peak rss %.1f MB, summed", len(rep.Agents), rep.Client.CPUSeconds, rep.Client.AvgCPUPercent, rep.Client.PeakRSSMB)
		for i, a := range rep.Agents {
			p("  agent %d\t%s: %d users, sent %d, delivered %d, lost %d, p99 %.2f ms, errors %d; cpu %.0f%% of a core (%d CPUs), peak rss %.1f MB",
				i+1, a.Agent, a.Users, a.Sent, a.Unique, a.Lost, a.Deliver.P99, a.ErrorCount, a.Client.AvgCPUPercent, a.Host.CPUs, a.Client.PeakRSSMB)
		}
	} else {
		p("load tester\tcpu %.1f s (%.0f%% of a core), peak rss %.1f MB", rep.Client.CPUSeconds, rep.Client.AvgCPUPercent, rep.Client.PeakRSSMB)
	}
	for _, l := range rep.LostSamples {
		p("  lost\t%s", l)
	}
	for _, e := range rep.Errors {
		p("  error\t%s", e)
	}
	if rep.Verdict != nil {
		p("")
		for _, r := range rep.Verdict.Results {
			mark := "ok"
			if !r.Passed {
				mark = "FAILED"
			}
			p("threshold	%s	%s	(%s = %s)", r.Expr, mark, r.Figure, formatFigure(r.Actual))
		}
	}
	p("")
	if f := rep.Failures(); len(f) > 0 {
		p("FAIL: %s", strings.Join(f, "; "))
	} else {
		p("PASS")
	}
	if rep.Interrupted {
		p("(interrupted: the grace period may have been cut short)")
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

func codes(m map[string]int64) string {
	if len(m) == 0 {
		return ""
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}

func cuts(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	conv := make(map[string]int64, len(m))
	for k, v := range m {
		conv[k] = int64(v)
	}
	return codes(conv)
}

func kbps(n int) string {
	if n <= 0 {
		return "unlimited"
	}
	return fmt.Sprintf("%d KB/s", n)
}

// resumes formats the crash scenario's resume times, -1 being "never".
func resumes(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		if x < 0 {
			parts[i] = "never"
		} else {
			parts[i] = fmt.Sprintf("%.0f", x)
		}
	}
	return strings.Join(parts, " ")
}

func floats(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%.0f", x)
	}
	return strings.Join(parts, " ")
}
