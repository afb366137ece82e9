package loadtest

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
)

// ReadReport reads a report written by WriteJSON.
func ReadReport(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read report: %w", err)
	}
	var rep Report
	if err := json.Unmarshal(b, &rep); err != nil {
		return nil, fmt.Errorf("decode report %s: %w", path, err)
	}
	return &rep, nil
}

// metric is one comparable number of a report.
type metric struct {
	name  string
	value func(*Report) (float64, bool)
}

func counted(f func(*Report) float64) func(*Report) (float64, bool) {
	return func(r *Report) (float64, bool) { return f(r), true }
}

func measured(f func(*Report) float64, ok func(*Report) bool) func(*Report) (float64, bool) {
	return func(r *Report) (float64, bool) {
		if !ok(r) {
			return 0, false
		}
		return f(r), true
	}
}

func hasServer(r *Report) bool   { return r.Server != nil }
func hasDrain(r *Report) bool    { return r.Drain != nil }
func hasLatency(r *Report) bool  { return r.Deliver.Count > 0 }
func hasReceipts(r *Report) bool { return r.Receipt.Count > 0 }
func hasConnect(r *Report) bool  { return r.Connect != nil }
func hasRestart(r *Report) bool  { return r.Restart != nil }

// hasConnectRSS reports whether the connect scenario measured the
// server's memory before and after its connections.
func hasConnectRSS(r *Report) bool {
	return r.Connect != nil && r.Connect.ServerRSSBeforeMB > 0 && r.Connect.ServerRSSHeldMB > 0
}

// hasCPUPerMessage reports whether the server's CPU per delivered message is known.
func hasCPUPerMessage(r *Report) bool { return r.Server != nil && r.Counts.Unique > 0 }

// metricsFor lists what is worth comparing in the scenario of r, the
// first report of a pair, whose settings may name a metric.
func metricsFor(r *Report) []metric {
	integrity := []metric{
		{"lost (PUBACKed, never delivered)", counted(func(r *Report) float64 { return float64(r.Counts.Lost) })},
		{"duplicates", counted(func(r *Report) float64 { return float64(r.Counts.Duplicates) })},
		{"order violations", counted(func(r *Report) float64 { return float64(r.Counts.OrderViolations) })},
	}
	resources := []metric{
		{"server CPU (s)", measured(func(r *Report) float64 { return r.Server.CPUSeconds }, hasServer)},
		{"server peak RSS (MiB)", measured(func(r *Report) float64 { return r.Server.PeakRSSMB }, hasServer)},
		{"load tester CPU (s)", counted(func(r *Report) float64 { return r.Client.CPUSeconds })},
	}
	var out []metric
	switch r.Scenario {
	case ScenarioConnect:
		settled := 0.0
		if r.Connect != nil {
			settled = r.Connect.SettledSec
		}
		return append([]metric{
			{"connected", measured(func(r *Report) float64 { return float64(r.Connect.Connected) }, hasConnect)},
			{"failed", measured(func(r *Report) float64 { return float64(r.Connect.Failed) }, hasConnect)},
			{fmt.Sprintf("server RSS KiB per connection, settled %.0f s", settled),
				measured(func(r *Report) float64 { return r.Connect.RSSPerConnKB }, hasConnectRSS)},
			{"server RSS with the connections open (MiB)", measured(func(r *Report) float64 { return r.Connect.ServerRSSHeldMB }, hasConnectRSS)},
			{"CONNECT→SUBACK p99 (ms)", counted(func(r *Report) float64 { return r.Connections.Suback.P99 })},
		}, resources...)
	case ScenarioDrain:
		out = []metric{
			{"queued for the offline user (msg/s)", measured(func(r *Report) float64 { return r.Drain.QueueRate }, hasDrain)},
			{"drain rate (msg/s)", measured(func(r *Report) float64 { return r.Drain.DrainRate }, hasDrain)},
			{"drain time (s)", measured(func(r *Report) float64 { return r.Drain.DrainSec }, hasDrain)},
			{"send→PUBACK p99 (ms)", counted(func(r *Report) float64 { return r.Ack.P99 })},
		}
	case ScenarioRestart:
		out = []metric{
			{"queued (PUBACKed) before SIGKILL", measured(func(r *Report) float64 { return float64(r.Restart.Queued) }, hasRestart)},
			{"queue rate (msg/s)", measured(func(r *Report) float64 { return r.Restart.QueueRate }, hasRestart)},
			{"new process start → MQTT port accepts (s)", measured(func(r *Report) float64 { return r.Restart.ReadySec }, hasRestart)},
			{"new process start → first CONNACK (s)", measured(func(r *Report) float64 { return r.Restart.ConnackSec }, hasRestart)},
			{"new process start → first queued message delivered (s)", measured(func(r *Report) float64 { return r.Restart.FirstDeliverySec }, hasRestart)},
			{"delivered after the restart", measured(func(r *Report) float64 { return float64(r.Restart.Delivered) }, hasRestart)},
			{"drain time (s)", measured(func(r *Report) float64 { return r.Restart.DrainSec }, hasRestart)},
			{"drain rate (msg/s)", measured(func(r *Report) float64 { return r.Restart.DrainRate }, hasRestart)},
			{"refused (error events)", counted(func(r *Report) float64 { return float64(r.Counts.Refused) })},
		}
	default:
		out = []metric{
			{"throughput (delivered msg/s)", counted(func(r *Report) float64 { return r.Throughput })},
			{"send→deliver p50 (ms)", measured(func(r *Report) float64 { return r.Deliver.P50 }, hasLatency)},
			{"send→deliver p99 (ms)", measured(func(r *Report) float64 { return r.Deliver.P99 }, hasLatency)},
			{"send→deliver max (ms)", measured(func(r *Report) float64 { return r.Deliver.Max }, hasLatency)},
			{"send→PUBACK p99 (ms)", counted(func(r *Report) float64 { return r.Ack.P99 })},
			{"send→delivered receipt p99 (ms)", measured(func(r *Report) float64 { return r.Receipt.P99 }, hasReceipts)},
		}
		out = append(out, integrity...)
		cpu := metric{"server CPU per delivered message (µs)", measured(cpuPerMessage, hasCPUPerMessage)}
		return append(out, resources[0], cpu, resources[1], resources[2])
	}
	out = append(out, integrity...)
	return append(out, resources...)
}

// cpuPerMessage is the server's CPU time per message delivered, in
// microseconds, over the whole run (connections and grace included).
func cpuPerMessage(r *Report) float64 {
	return r.Server.CPUSeconds * 1e6 / float64(r.Counts.Unique)
}

// WriteComparison writes a Markdown table comparing pairs of reports of
// the same scenario, each pair being (ours, theirs), with the ratio
// ours/theirs. Either report of a pair may be nil, for a run made against
// one server only; its cells show "–".
func WriteComparison(w io.Writer, ours, theirs string, pairs [][2]*Report) error {
	if _, err := fmt.Fprintf(w, "| scenario | metric | %s | %s | ratio |\n|---|---|---:|---:|---:|\n", ours, theirs); err != nil {
		return fmt.Errorf("write comparison: %w", err)
	}
	for i, p := range pairs {
		first := p[0]
		switch {
		case p[0] == nil && p[1] == nil:
			return fmt.Errorf("pair %d: no report", i+1)
		case p[0] == nil:
			first = p[1]
		case p[1] != nil && p[0].Scenario != p[1].Scenario:
			return fmt.Errorf("compare %s with %s: not the same scenario", p[0].Scenario, p[1].Scenario)
		}
		for _, m := range metricsFor(first) {
			a, aok := valueOf(m, p[0])
			b, bok := valueOf(m, p[1])
			if !aok && !bok {
				continue
			}
			if _, err := fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", label(first), m.name, cell(a, aok), cell(b, bok), ratio(a, b, aok && bok)); err != nil {
				return fmt.Errorf("write comparison: %w", err)
			}
		}
	}
	return nil
}

// valueOf returns m of r, not measured when r is nil.
func valueOf(m metric, r *Report) (float64, bool) {
	if r == nil {
		return 0, false
	}
	return m.value(r)
}

// label names a run in a comparison: its scenario, its rate when fixed,
// its connections for the connect scenario, its queued messages for the
// restart scenario, and its label when it has one.
func label(r *Report) string {
	s := r.Scenario
	switch {
	case r.Scenario == ScenarioConnect:
		s = fmt.Sprintf("%s ×%d", s, r.Settings.Users)
	case r.Scenario == ScenarioRestart:
		s = fmt.Sprintf("%s, %d queued", s, r.Settings.Messages)
	case r.Settings.Rate > 0:
		s = fmt.Sprintf("%s @%.0f/s", s, r.Settings.Rate)
	}
	if r.Settings.Label != "" {
		s += " (" + r.Settings.Label + ")"
	}
	return s
}

func cell(v float64, ok bool) string {
	switch {
	case !ok:
		return "–"
	case v >= 100 || v == float64(int64(v)):
		return fmt.Sprintf("%.0f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func ratio(a, b float64, ok bool) string {
	if !ok || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}
