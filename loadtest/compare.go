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

func hasServer(r *Report) bool  { return r.Server != nil }
func hasDrain(r *Report) bool   { return r.Drain != nil }
func hasLatency(r *Report) bool { return r.Deliver.Count > 0 }

// metricsFor lists what is worth comparing in each scenario.
func metricsFor(scenario string) []metric {
	common := []metric{
		{"lost (PUBACKed, never delivered)", counted(func(r *Report) float64 { return float64(r.Counts.Lost) })},
		{"duplicates", counted(func(r *Report) float64 { return float64(r.Counts.Duplicates) })},
		{"order violations", counted(func(r *Report) float64 { return float64(r.Counts.OrderViolations) })},
		{"server CPU (s)", measured(func(r *Report) float64 { return r.Server.CPUSeconds }, hasServer)},
		{"server peak RSS (MiB)", measured(func(r *Report) float64 { return r.Server.PeakRSSMB }, hasServer)},
		{"load tester CPU (s)", counted(func(r *Report) float64 { return r.Client.CPUSeconds })},
	}
	switch scenario {
	case ScenarioDrain:
		return append([]metric{
			{"queued for the offline user (msg/s)", measured(func(r *Report) float64 { return r.Drain.QueueRate }, hasDrain)},
			{"drain rate (msg/s)", measured(func(r *Report) float64 { return r.Drain.DrainRate }, hasDrain)},
			{"drain time (s)", measured(func(r *Report) float64 { return r.Drain.DrainSec }, hasDrain)},
			{"send→PUBACK p99 (ms)", counted(func(r *Report) float64 { return r.Ack.P99 })},
		}, common...)
	default:
		return append([]metric{
			{"throughput (delivered msg/s)", counted(func(r *Report) float64 { return r.Throughput })},
			{"send→deliver p50 (ms)", measured(func(r *Report) float64 { return r.Deliver.P50 }, hasLatency)},
			{"send→deliver p99 (ms)", measured(func(r *Report) float64 { return r.Deliver.P99 }, hasLatency)},
			{"send→deliver max (ms)", measured(func(r *Report) float64 { return r.Deliver.Max }, hasLatency)},
			{"send→PUBACK p99 (ms)", counted(func(r *Report) float64 { return r.Ack.P99 })},
		}, common...)
	}
}

// WriteComparison writes a Markdown table comparing pairs of reports of
// the same scenario, each pair being (ours, theirs), with the ratio
// ours/theirs.
func WriteComparison(w io.Writer, ours, theirs string, pairs [][2]*Report) error {
	if _, err := fmt.Fprintf(w, "| scenario | metric | %s | %s | ratio |\n|---|---|---:|---:|---:|\n", ours, theirs); err != nil {
		return fmt.Errorf("write comparison: %w", err)
	}
	for _, p := range pairs {
		if p[0].Scenario != p[1].Scenario {
			return fmt.Errorf("compare %s with %s: not the same scenario", p[0].Scenario, p[1].Scenario)
		}
		for _, m := range metricsFor(p[0].Scenario) {
			a, aok := m.value(p[0])
			b, bok := m.value(p[1])
			if !aok && !bok {
				continue
			}
			if _, err := fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", label(p[0]), m.name, cell(a, aok), cell(b, bok), ratio(a, b, aok && bok)); err != nil {
				return fmt.Errorf("write comparison: %w", err)
			}
		}
	}
	return nil
}

// label names a run in a comparison: its scenario, and its rate when fixed.
func label(r *Report) string {
	if r.Settings.Rate > 0 {
		return fmt.Sprintf("%s @%.0f/s", r.Scenario, r.Settings.Rate)
	}
	return r.Scenario
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
