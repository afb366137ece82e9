package loadtest

import (
	"encoding/csv"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Progresses returns a Progress that passes every update to each of ps,
// skipping nil ones: the progress line, a CSV file and a Prometheus
// endpoint watch the same run.
func Progresses(ps ...Progress) Progress {
	var out multiProgress
	for _, p := range ps {
		if p != nil {
			out = append(out, p)
		}
	}
	return out
}

type multiProgress []Progress

func (m multiProgress) Update(s Status) {
	for _, p := range m {
		p.Update(s)
	}
}

func (m multiProgress) Done() error {
	var errs []error
	for _, p := range m {
		errs = append(errs, p.Done())
	}
	return errors.Join(errs...)
}

// csvHeader names the columns of the per-second CSV, the fields of Point.
var csvHeader = []string{"t_s", "phase", "sent_per_s", "acked_per_s", "delivered_per_s", "duplicates",
	"p99_ms", "errors", "connected", "server_cpu_pct", "server_rss_mb", "client_cpu_pct"}

// CSVSeries writes the report's per-second series to a file as the run
// goes, one line a second, flushed at once, so that a run can be watched
// (tail -f) or plotted while it lasts.
type CSVSeries struct {
	f   *os.File
	w   *csv.Writer
	err error
}

// NewCSVSeries creates path and writes the header.
func NewCSVSeries(path string) (*CSVSeries, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("csv series: %w", err)
	}
	c := &CSVSeries{f: f, w: csv.NewWriter(f)}
	c.write(csvHeader)
	if c.err != nil {
		f.Close()
		return nil, c.err
	}
	return c, nil
}

func (c *CSVSeries) write(rec []string) {
	if c.err != nil {
		return
	}
	if err := c.w.Write(rec); err != nil {
		c.err = fmt.Errorf("csv series: %w", err)
		return
	}
	c.w.Flush()
	if err := c.w.Error(); err != nil {
		c.err = fmt.Errorf("csv series: %w", err)
	}
}

// Update writes the interval that just ended.
func (c *CSVSeries) Update(s Status) {
	p := s.Point
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	i := func(v int64) string { return strconv.FormatInt(v, 10) }
	c.write([]string{f(p.T), p.Phase, f(p.SentPerSec), f(p.AckedPerSec), f(p.DeliveredPerSec), i(p.Duplicates),
		f(p.P99Ms), i(p.Errors), i(p.Connected), f(p.ServerCPU), f(p.ServerRSSMB), f(p.ClientCPU)})
}

// Done closes the file and returns the first error writing it.
func (c *CSVSeries) Done() error {
	if err := c.f.Close(); err != nil && c.err == nil {
		c.err = fmt.Errorf("csv series: %w", err)
	}
	return c.err
}

// WriteCSV writes the report's per-second series to path, in the columns
// of CSVSeries: for a run on agents, whose series is only known merged
// at the end.
func (rep *Report) WriteCSV(path string) error {
	c, err := NewCSVSeries(path)
	if err != nil {
		return err
	}
	for _, p := range rep.Series {
		c.Update(Status{Point: p})
	}
	return c.Done()
}

// Exporter serves a run's live figures in Prometheus's text format at
// /metrics, so that a run can be watched in Grafana beside the server's
// own metrics. Every series carries the scenario as a label. It serves
// until Done.
type Exporter struct {
	ln  net.Listener
	srv *http.Server

	mu       sync.Mutex
	status   Status
	done     chan struct{}
	serveErr error
}

// exportedFigure is one metric of the Exporter and how it is read from a status.
type exportedFigure struct {
	name, help string
	counter    bool
	value      func(Status) float64
}

var exportedFigures = []exportedFigure{
	{"loadtest_messages_sent_total", "Messages handed to the MQTT clients.", true, func(s Status) float64 { return float64(s.Counts.Sent) }},
	{"loadtest_messages_acked_total", "Messages the broker PUBACKed.", true, func(s Status) float64 { return float64(s.Counts.Acked) }},
	{"loadtest_messages_delivered_total", "First deliveries of messages to devices.", true, func(s Status) float64 { return float64(s.Counts.Unique) }},
	{"loadtest_duplicates_total", "Deliveries beyond the first of a message to a device.", true, func(s Status) float64 { return float64(s.Counts.Duplicates) }},
	{"loadtest_errors_total", "Errors: failed publishes, error events, malformed or misrouted deliveries, client errors.", true, func(s Status) float64 { return float64(s.Errors) }},
	{"loadtest_receipts_total", "Receipt events received (chatd).", true, func(s Status) float64 { return float64(s.Counts.Receipts) }},
	{"loadtest_connected_clients", "Client connections up.", false, func(s Status) float64 { return float64(s.Connected) }},
	{"loadtest_deliver_p99_seconds", "send->deliver p99 of the last second's first deliveries.", false, func(s Status) float64 { return s.Point.P99Ms / 1000 }},
	{"loadtest_deliver_p99_run_seconds", "send->deliver p99 of the run so far.", false, func(s Status) float64 { return s.P99Ms / 1000 }},
	{"loadtest_send_rate", "Publishes per second over the last second.", false, func(s Status) float64 { return s.Point.SentPerSec }},
	{"loadtest_deliver_rate", "First deliveries per second over the last second.", false, func(s Status) float64 { return s.Point.DeliveredPerSec }},
	{"loadtest_server_cpu_percent", "The server's CPU use in percent of one core (when it runs here).", false, func(s Status) float64 { return s.Point.ServerCPU }},
	{"loadtest_server_rss_bytes", "The server's resident memory (when it runs here).", false, func(s Status) float64 { return s.Point.ServerRSSMB * (1 << 20) }},
	{"loadtest_elapsed_seconds", "Time since the run started.", false, func(s Status) float64 { return s.Elapsed.Seconds() }},
}

// NewExporter listens on addr (host:port; port 0 picks one) and serves
// the figures of the run it is then given updates of.
func NewExporter(addr, scenario string) (*Exporter, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	e := &Exporter{ln: ln, done: make(chan struct{})}
	reg := prometheus.NewRegistry()
	for _, f := range exportedFigures {
		read := func() float64 {
			e.mu.Lock()
			defer e.mu.Unlock()
			return f.value(e.status)
		}
		labels := prometheus.Labels{"scenario": scenario}
		if f.counter {
			reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: f.name, Help: f.help, ConstLabels: labels}, read))
		} else {
			reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: f.name, Help: f.help, ConstLabels: labels}, read))
		}
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	e.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		defer close(e.done)
		if err := e.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			e.mu.Lock()
			e.serveErr = fmt.Errorf("metrics listener: %w", err)
			e.mu.Unlock()
		}
	}()
	return e, nil
}

// Addr is the address the exporter listens on.
func (e *Exporter) Addr() string { return e.ln.Addr().String() }

// Update makes s the figures served.
func (e *Exporter) Update(s Status) {
	e.mu.Lock()
	e.status = s
	e.mu.Unlock()
}

// Done stops serving and returns the first error serving met.
func (e *Exporter) Done() error {
	err := e.srv.Close()
	<-e.done
	e.mu.Lock()
	defer e.mu.Unlock()
	return errors.Join(err, e.serveErr)
}
