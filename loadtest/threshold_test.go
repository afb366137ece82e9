package loadtest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseThreshold(t *testing.T) {
	tests := []struct {
		in      string
		figure  string
		op      string
		value   float64
		wantErr string
	}{
		{in: "p99(send->deliver)<5ms", figure: "deliver_latency.p99_ms", op: "<", value: 5},
		{in: " p99.9( send->PUBACK ) <= 2s ", figure: "ack_latency.p99_9_ms", op: "<=", value: 2000},
		{in: "max(CONNECT->CONNACK)<250us", figure: "connections.connack_latency.max_ms", op: "<", value: 0.25},
		{in: "mean(send->sent copy)<1m", figure: "copy_latency.mean_ms", op: "<", value: 60000},
		{in: "count(send->receipt)>0", figure: "receipt_latency.count", op: ">", value: 0},
		{in: "p50(send->deliver)<3", figure: "deliver_latency.p50_ms", op: "<", value: 3},
		{in: "lost==0", figure: "counts.lost", op: "==", value: 0},
		{in: "throughput>=2000", figure: "throughput_per_s", op: ">=", value: 2000},
		{in: "connections.reconnects!=1", figure: "connections.reconnects", op: "!=", value: 1},
		{in: "server.avg_cpu_percent < 150", figure: "server.avg_cpu_percent", op: "<", value: 150},
		{in: "reason(puback:0x97)==0", figure: "reason_codes.puback.0x97", op: "==", value: 0},
		{in: "reason( DISCONNECT : 152 ) < 3", figure: "reason_codes.disconnect.0x98", op: "<", value: 3},
		{in: "reason(pubrec:0x97)==0", wantErr: "reason(PACKET:CODE)"},
		{in: "reason(puback:0x197)==0", wantErr: "reason(PACKET:CODE)"},
		{in: "reason(puback)==0", wantErr: "reason(PACKET:CODE)"},
		{in: "lost = 0", wantErr: "FIGURE OP VALUE"},
		{in: "p99(send->deliver)", wantErr: "FIGURE OP VALUE"},
		{in: "p42(send->deliver)<5", wantErr: "statistic"},
		{in: "p99(send->nowhere)<5", wantErr: "latency"},
		{in: "lost<5ms", wantErr: "only for latencies"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseThreshold(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseThreshold(%q) = %+v, %v; want an error about %s", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got.Figure != tt.figure || got.Op != tt.op || got.Value != tt.value {
				t.Fatalf("ParseThreshold(%q) = %+v, %v; want %s %s %v", tt.in, got, err, tt.figure, tt.op, tt.value)
			}
		})
	}
}

// TestEvaluate checks thresholds both ways against a report, and that a
// figure the report lacks is an error rather than a pass.
func TestEvaluate(t *testing.T) {
	rep := &Report{Scenario: ScenarioChat, Throughput: 2500, Deliver: Percentiles{Count: 10, P99: 4.2},
		Counts: Counts{Sent: 10, Acked: 10, Unique: 10, Delivered: 10}}
	parse := func(exprs ...string) []Threshold {
		var out []Threshold
		for _, e := range exprs {
			th, err := ParseThreshold(e)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, th)
		}
		return out
	}
	v, err := Evaluate(rep, parse("p99(send->deliver)<5ms", "lost==0", "throughput>=2000", "p99(send->sent copy)==0"))
	if err != nil || !v.Passed || len(v.Failed()) != 0 {
		t.Fatalf("passing thresholds: %+v, %v", v, err)
	}
	rep.Verdict = v
	if code := rep.ExitCode(); code != 0 {
		t.Errorf("exit code %d with every threshold held", code)
	}
	v, err = Evaluate(rep, parse("p99(send->deliver)<4ms", "lost==0", "throughput>2500"))
	if err != nil || v.Passed {
		t.Fatalf("failing thresholds: %+v, %v", v, err)
	}
	failed := v.Failed()
	if len(failed) != 2 || failed[0].Expr != "p99(send->deliver)<4ms" || failed[0].Actual != 4.2 || failed[1].Expr != "throughput>2500" {
		t.Fatalf("failed: %+v, want the latency and the throughput", failed)
	}
	rep.Verdict = v
	if code := rep.ExitCode(); code != 3 {
		t.Errorf("exit code %d with a threshold failed, want 3", code)
	}
	rep.Counts.Lost = 1
	if code := rep.ExitCode(); code != 1 {
		t.Errorf("exit code %d with a message lost and a threshold failed, want 1", code)
	}
	rep.Counts.Lost = 0
	rep.ReasonCodes = []ReasonCount{{Packet: packetPuback, Code: 0x97, Name: "quota exceeded", Count: 4}}
	v, err = Evaluate(rep, parse("reason(puback:0x97)==4", "reason(puback:0x87)==0", "reason(puback:0x97)==0"))
	if err != nil || len(v.Results) != 3 || !v.Results[0].Passed || !v.Results[1].Passed || v.Results[2].Passed {
		t.Errorf("reason code thresholds: %+v, %v; want the count of 0x97 read as 4, of 0x87 as 0", v, err)
	}
	rep.ReasonCodes = nil
	if _, err := Evaluate(rep, parse("counts.lsot==0")); err == nil || !strings.Contains(err.Error(), "no figure") {
		t.Errorf("a misspelt figure: %v, want an error", err)
	}

	// The verdict is in the table and in the HTML report.
	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"p99(send->deliver)<4ms", "FAILED", "deliver_latency.p99_ms = 4.2", "FAIL: threshold"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	html := filepath.Join(t.TempDir(), "r.html")
	if err := rep.WriteHTML(html); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(html)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "<code>throughput&gt;2500</code>") || !strings.Contains(string(b), "FAILED") {
		t.Errorf("HTML report lacks the verdict")
	}
}

// TestThresholdsOfARun gates a real run against chatd: loose thresholds
// hold, an impossible one fails.
func TestThresholdsOfARun(t *testing.T) {
	cfg := testConfig(ScenarioChat, startChatd(t))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := Run(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ts []Threshold
	for _, e := range []string{"lost==0", "p99(send->deliver)<10s", "throughput>0", "counts.acked>=1", "p50(send->deliver)<0.001us"} {
		th, err := ParseThreshold(e)
		if err != nil {
			t.Fatal(err)
		}
		ts = append(ts, th)
	}
	v, err := Evaluate(rep, ts)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range v.Results {
		if want := i < 4; r.Passed != want {
			t.Errorf("%s: passed %v (actual %v), want %v", r.Expr, r.Passed, r.Actual, want)
		}
	}
}
