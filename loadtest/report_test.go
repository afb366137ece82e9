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

// TestComparisonRows checks the rows each scenario adds to a comparison,
// labels, and pairs with a missing report.
func TestComparisonRows(t *testing.T) {
	rate := func(label string, receipts int64) *Report {
		return &Report{
			Scenario: ScenarioChat,
			Settings: Settings{Rate: 5000, Label: label},
			Counts:   Counts{Unique: 40000},
			Deliver:  Percentiles{Count: 40000, P99: 3},
			Receipt:  Percentiles{Count: receipts, P99: 7.5},
			Server:   &ProcUsage{CPUSeconds: 2},
		}
	}
	connect := func(before, held float64, connected int) *Report {
		return &Report{
			Scenario: ScenarioConnect,
			Settings: Settings{Users: 10000},
			Connect: &ConnectResult{Target: 10000, Connected: connected, Failed: 10000 - connected,
				SettledSec: 30.02, ServerRSSBeforeMB: before, ServerRSSHeldMB: held,
				RSSPerConnKB: (held - before) * 1024 / float64(connected)},
		}
	}
	restart := &Report{
		Scenario: ScenarioRestart,
		Settings: Settings{Messages: 1000},
		Counts:   Counts{Acked: 1000, Unique: 1000},
		Restart: &RestartResult{Queued: 1000, QueueRate: 25000, ReadySec: 0.25, ConnackSec: 0.3,
			FirstDeliverySec: 0.5, Delivered: 1000, DrainSec: 2, DrainRate: 500, Complete: true},
	}
	noServer := rate("", 0)
	noServer.Server = nil
	tests := []struct {
		name    string
		pairs   [][2]*Report
		want    []string
		notWant []string
		wantErr string
	}{
		{
			name:  "CPU per delivered message",
			pairs: [][2]*Report{{rate("", 0), noServer}},
			want: []string{
				"| chat @5000/s | server CPU per delivered message (µs) | 50 | – | – |",
				"| chat @5000/s | send→deliver p99 (ms) | 3 | 3 | 1.00× |",
			},
			notWant: []string{"receipt"},
		},
		{
			name:  "receipts on: labelled, with the receipt latency",
			pairs: [][2]*Report{{rate("receipts on", 40000), rate("", 0)}},
			want: []string{
				"| chat @5000/s (receipts on) | send→delivered receipt p99 (ms) | 7.50 | – | – |",
				"| chat @5000/s (receipts on) | send→deliver p99 (ms) | 3 | 3 | 1.00× |",
			},
		},
		{
			name:  "connect",
			pairs: [][2]*Report{{connect(50, 100, 10000), connect(2, 12, 9990)}},
			want: []string{
				"| connect ×10000 | connected | 10000 | 9990 | 1.00× |",
				"| connect ×10000 | failed | 0 | 10 | 0.00× |",
				"| connect ×10000 | server RSS KiB per connection, settled 30 s | 5.12 | 1.03 | 5.00× |",
				"| connect ×10000 | server RSS with the connections open (MiB) | 100 | 12 | 8.33× |",
			},
			notWant: []string{"lost", "per delivered message"},
		},
		{
			name:    "connect without server memory",
			pairs:   [][2]*Report{{connect(0, 0, 10), connect(0, 0, 10)}},
			want:    []string{"| connect ×10000 | connected | 10 | 10 | 1.00× |"},
			notWant: []string{"KiB per connection"},
		},
		{
			name:  "restart against ours only",
			pairs: [][2]*Report{{restart, nil}},
			want: []string{
				"| restart, 1000 queued | queued (PUBACKed) before SIGKILL | 1000 | – | – |",
				"| restart, 1000 queued | new process start → MQTT port accepts (s) | 0.25 | – | – |",
				"| restart, 1000 queued | new process start → first queued message delivered (s) | 0.50 | – | – |",
				"| restart, 1000 queued | delivered after the restart | 1000 | – | – |",
				"| restart, 1000 queued | lost (PUBACKed, never delivered) | 0 | – | – |",
			},
		},
		{
			name:  "theirs only",
			pairs: [][2]*Report{{nil, restart}},
			want:  []string{"| restart, 1000 queued | drain rate (msg/s) | – | 500 | – |"},
		},
		{name: "no report", pairs: [][2]*Report{{nil, nil}}, wantErr: "no report"},
		{name: "different scenarios", pairs: [][2]*Report{{rate("", 0), restart}}, wantErr: "not the same scenario"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			err := WriteComparison(&b, "chatd", "mosquitto", tt.pairs)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			out := b.String()
			for _, want := range tt.want {
				if !strings.Contains(out, want) {
					t.Errorf("comparison lacks %q:\n%s", want, out)
				}
			}
			for _, no := range tt.notWant {
				if strings.Contains(out, no) {
					t.Errorf("comparison has %q:\n%s", no, out)
				}
			}
		})
	}
}

// TestWriteTableNewResults checks that the text report says how the
// connect scenario's memory was settled, the restart scenario's timings,
// and the run's label.
func TestWriteTableNewResults(t *testing.T) {
	tests := []struct {
		name string
		rep  Report
		want []string
	}{
		{"connect", Report{Scenario: ScenarioConnect, Connect: &ConnectResult{Target: 10, Connected: 10,
			SettledSec: 30.4, ServerRSSBeforeMB: 10, ServerRSSHeldMB: 11, RSSPerConnKB: 102.4}},
			[]string{"102.4 KiB per connection, settled 30 s"}},
		{"restart", Report{Scenario: ScenarioRestart, Settings: Settings{Label: "receipts off"},
			Restart: &RestartResult{Queued: 20, Recipients: 2, ReadySec: 1.5, ConnackSec: 1.75, FirstDeliverySec: 2, Delivered: 20, Complete: true}},
			[]string{"(chatd, receipts off)", "queued 20 for 2 offline users", "accepting connections after 1.50 s",
				"first CONNACK after 1.75 s", "first queued message after 2.00 s", "20 delivered"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := tt.rep.WriteTable(&b); err != nil {
				t.Fatal(err)
			}
			for _, want := range tt.want {
				if !strings.Contains(b.String(), want) {
					t.Errorf("table lacks %q:\n%s", want, b.String())
				}
			}
		})
	}
}
