package loadtest

import (
	"bytes"
	"strings"
	"testing"
)

func TestReportVerdict(t *testing.T) {
	tests := []struct {
		name     string
		rep      Report
		wantCode int
		wantFail string // a substring of the failures, "" for a pass
	}{
		{"clean", Report{Counts: Counts{Sent: 10, Acked: 10, Unique: 10, Duplicates: 3}}, 0, ""},
		{"in flight only", Report{Counts: Counts{Sent: 10, Unique: 9, InFlight: 1}}, 0, ""},
		{"lost", Report{Counts: Counts{Sent: 10, Unique: 9, Lost: 1}}, 1, "1 messages lost"},
		{"reordered", Report{Counts: Counts{OrderViolations: 2}}, 1, "2 order violations"},
		{"misrouted", Report{Counts: Counts{Misrouted: 1}}, 1, "misrouted"},
		{"refused", Report{Counts: Counts{Refused: 1}}, 2, "refused"},
		{"send failures", Report{Counts: Counts{SendFailed: 4}}, 2, "4 publishes failed"},
		{"errors", Report{ErrorCount: 3}, 2, "3 errors"},
		{"interrupted", Report{Interrupted: true, Counts: Counts{Lost: 5}}, 2, "interrupted"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.rep.ExitCode(); got != tt.wantCode {
				t.Errorf("exit code %d, want %d", got, tt.wantCode)
			}
			fails := strings.Join(tt.rep.Failures(), "; ")
			if tt.wantFail == "" && fails != "" || !strings.Contains(fails, tt.wantFail) {
				t.Errorf("failures %q, want %q", fails, tt.wantFail)
			}
			var b bytes.Buffer
			if err := tt.rep.WriteTable(&b); err != nil {
				t.Fatal(err)
			}
			verdict := "PASS"
			if tt.wantFail != "" {
				verdict = "FAIL"
			}
			if !strings.Contains(b.String(), verdict) {
				t.Errorf("table lacks %s:\n%s", verdict, b.String())
			}
		})
	}
}

func TestWriteComparison(t *testing.T) {
	chatA := &Report{Scenario: ScenarioChat, Throughput: 2000, Deliver: Percentiles{Count: 1, P50: 1, P99: 4, Max: 9}, Server: &ProcUsage{CPUSeconds: 2, PeakRSSMB: 100}}
	chatB := &Report{Scenario: ScenarioChat, Throughput: 1000, Deliver: Percentiles{Count: 1, P50: 2, P99: 8, Max: 9}}
	drainA := &Report{Scenario: ScenarioDrain, Drain: &DrainResult{QueueRate: 300, DrainRate: 500, DrainSec: 2}}
	drainB := &Report{Scenario: ScenarioDrain, Drain: &DrainResult{QueueRate: 100, DrainRate: 1000, DrainSec: 1}}
	var b bytes.Buffer
	if err := WriteComparison(&b, "chatd", "mosquitto", [][2]*Report{{chatA, chatB}, {drainA, drainB}}); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"| scenario | metric | chatd | mosquitto | ratio |",
		"| chat | throughput (delivered msg/s) | 2000 | 1000 | 2.00× |",
		"| chat | send→deliver p99 (ms) | 4 | 8 | 0.50× |",
		"| chat | server CPU (s) | 2 | – | – |",
		"| drain | drain rate (msg/s) | 500 | 1000 | 0.50× |",
		"| drain | lost (PUBACKed, never delivered) | 0 | 0 | – |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("comparison lacks %q:\n%s", want, out)
		}
	}
	if err := WriteComparison(&b, "a", "b", [][2]*Report{{chatA, drainB}}); err == nil {
		t.Error("comparing different scenarios succeeded")
	}
}

func TestChartHelpers(t *testing.T) {
	ceil := []struct{ in, want float64 }{{0, 1}, {0.3, 0.5}, {1, 1}, {7, 10}, {120, 200}, {4500, 5000}}
	for _, tt := range ceil {
		if got := niceCeil(tt.in); got != tt.want {
			t.Errorf("niceCeil(%g) = %g, want %g", tt.in, got, tt.want)
		}
	}
	trim := []struct {
		in   float64
		want string
	}{{0.1, "0.1"}, {2, "2"}, {0.005, "0.005"}, {1234.5, "1234.5"}}
	for _, tt := range trim {
		if got := trimFloat(tt.in); got != tt.want {
			t.Errorf("trimFloat(%g) = %q, want %q", tt.in, got, tt.want)
		}
	}
	if svg := string(lineChart("<title>", nil, nil)); !strings.Contains(svg, "no data") || strings.Contains(svg, "<title>") {
		t.Errorf("empty chart: %s", svg)
	}
}
