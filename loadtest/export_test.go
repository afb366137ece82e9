package loadtest

import (
	"context"
	"encoding/csv"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"
)

// TestExportWhileRunning watches a real run against chatd through its
// Prometheus endpoint while it lasts, and reads its CSV series after.
func TestExportWhileRunning(t *testing.T) {
	cfg := testConfig(ScenarioChat, startChatd(t))
	cfg.Duration = 3 * time.Second
	path := filepath.Join(t.TempDir(), "series.csv")
	series, err := NewCSVSeries(path)
	if err != nil {
		t.Fatal(err)
	}
	exp, err := NewExporter("127.0.0.1:0", cfg.Scenario)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	type result struct {
		rep *Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := Run(ctx, cfg, Progresses(nil, series, exp))
		done <- result{rep, err}
	}()

	delivered := regexp.MustCompile(`(?m)^loadtest_messages_delivered_total\{scenario="chat"\} (\S+)$`)
	testutil.EventuallyNoError(t, 30*time.Second, func() error {
		resp, err := http.Get("http://" + exp.Addr() + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		m := delivered.FindSubmatch(b)
		if m == nil {
			return fmt.Errorf("no delivered counter in:\n%s", b)
		}
		if v, _ := strconv.ParseFloat(string(m[1]), 64); v <= 0 {
			return fmt.Errorf("delivered %s", m[1])
		}
		return nil
	}, "the live figures never showed a delivery")

	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if _, err := http.Get("http://" + exp.Addr() + "/metrics"); err == nil {
		t.Error("the exporter still serves after the run")
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) < 3 || len(rows[0]) != len(csvHeader) || rows[0][0] != "t_s" {
		t.Fatalf("csv: %d rows, header %v", len(rows), rows[0])
	}
	if got, want := len(rows)-1, len(res.rep.Series); got != want {
		t.Errorf("csv has %d lines of series, the report %d", got, want)
	}
	var sent float64
	for _, r := range rows[1:] {
		v, err := strconv.ParseFloat(r[2], 64)
		if err != nil {
			t.Fatalf("csv row %v: %v", r, err)
		}
		sent += v
	}
	if sent <= 0 {
		t.Error("csv shows nothing sent")
	}
}
