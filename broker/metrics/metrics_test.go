package metrics

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/chatd/chatd/broker/msgpath/delivery"
	"github.com/chatd/chatd/broker/queue"
)

// fakeQueue is a Queue whose figures the test sets.
type fakeQueue struct {
	mu          sync.Mutex
	stats       queue.Stats
	undelivered uint64
	lsm, vlog   int64
	free        int64
	low         bool
}

func (q *fakeQueue) Stats() queue.Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.stats
}

func (q *fakeQueue) Undelivered() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.undelivered
}

func (q *fakeQueue) DiskSize() (int64, int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.lsm, q.vlog
}

func (q *fakeQueue) FreeBytes() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.free
}

func (q *fakeQueue) LowDisk() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.low
}

// fakeDelivery is a Delivery whose figures the test sets.
type fakeDelivery struct {
	mu    sync.Mutex
	stats delivery.Stats
}

func (d *fakeDelivery) Stats() delivery.Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stats
}

// newMetrics returns the metrics of a server, watching src if not nil.
// The only place that knows the constructors.
func newMetrics(src *Sources) *Metrics {
	m := New()
	if src != nil {
		m.Watch(*src)
	}
	return m
}

// scrape fetches /metrics from m's handler and parses it.
func scrape(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// sample names one value of the output: a counter's or gauge's by its
// name, a histogram's by its name and the suffix _count or _sum; labels
// as name=value pairs, comma-separated.
type sample struct {
	name   string
	labels string
	want   float64
}

// value finds s in fams.
func value(fams map[string]*dto.MetricFamily, s sample) (float64, error) {
	name, part := s.name, ""
	for _, suffix := range []string{"_count", "_sum"} {
		if base, ok := strings.CutSuffix(s.name, suffix); ok && fams[base].GetType() == dto.MetricType_HISTOGRAM {
			name, part = base, suffix
		}
	}
	fam, ok := fams[name]
	if !ok {
		return 0, fmt.Errorf("%s is not in /metrics", name)
	}
	for _, m := range fam.GetMetric() {
		var labels []string
		for _, l := range m.GetLabel() {
			labels = append(labels, l.GetName()+"="+l.GetValue())
		}
		sort.Strings(labels)
		if strings.Join(labels, ",") != s.labels {
			continue
		}
		switch {
		case part == "_count":
			return float64(m.GetHistogram().GetSampleCount()), nil
		case part == "_sum":
			return m.GetHistogram().GetSampleSum(), nil
		case fam.GetType() == dto.MetricType_COUNTER:
			return m.GetCounter().GetValue(), nil
		case fam.GetType() == dto.MetricType_GAUGE:
			return m.GetGauge().GetValue(), nil
		default:
			return 0, fmt.Errorf("%s is a %v", name, fam.GetType())
		}
	}
	return 0, fmt.Errorf("%s has no series {%s}", name, s.labels)
}

// check fails t for every sample of want that /metrics does not show.
func check(t *testing.T, fams map[string]*dto.MetricFamily, want []sample) {
	t.Helper()
	for _, s := range want {
		got, err := value(fams, s)
		if err != nil {
			t.Error(err)
			continue
		}
		// Sums of durations are float sums: exact to far below this.
		if diff := got - s.want; diff > 1e-9 || diff < -1e-9 {
			t.Errorf("%s{%s} = %v, want %v", s.name, s.labels, got, s.want)
		}
	}
}

// TestEventMetrics: each event method shows in /metrics with its value.
func TestEventMetrics(t *testing.T) {
	tests := []struct {
		name  string
		calls func(m *Metrics)
		want  []sample
	}{
		{"none", func(*Metrics) {}, []sample{
			{"chatd_connects_total", "", 0},
			{"chatd_publishes_delayed_total", "", 0},
			{"chatd_commit_seconds_count", "", 0},
			{"chatd_commit_batch_messages_count", "", 0},
			{"chatd_delivery_seconds_count", "", 0},
		}},
		{"Connected", func(m *Metrics) {
			m.Connected()
			m.Connected()
		}, []sample{{"chatd_connects_total", "", 2}}},
		{"Refused", func(m *Metrics) {
			m.Refused("queue_full")
			m.Refused("queue_full")
			m.Refused("no_space")
		}, []sample{
			{"chatd_refusals_total", "code=queue_full", 2},
			{"chatd_refusals_total", "code=no_space", 1},
		}},
		{"Delayed", func(m *Metrics) { m.Delayed() }, []sample{{"chatd_publishes_delayed_total", "", 1}}},
		{"Committed", func(m *Metrics) {
			m.Committed(5, 2*time.Millisecond)
			m.Committed(3, time.Millisecond)
		}, []sample{
			{"chatd_commit_batch_messages_count", "", 2},
			{"chatd_commit_batch_messages_sum", "", 8},
			{"chatd_commit_seconds_count", "", 2},
			{"chatd_commit_seconds_sum", "", 0.003},
		}},
		{"Acked", func(m *Metrics) { m.Acked(250 * time.Millisecond) }, []sample{
			{"chatd_delivery_seconds_count", "", 1},
			{"chatd_delivery_seconds_sum", "", 0.25},
		}},
		{"Disconnected", func(m *Metrics) {
			m.Disconnected("token_expired")
			m.Disconnected("write_timeout")
			m.Disconnected("write_timeout")
		}, []sample{
			{"chatd_disconnects_total", "reason=token_expired", 1},
			{"chatd_disconnects_total", "reason=write_timeout", 2},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMetrics(nil)
			tt.calls(m)
			check(t, scrape(t, m), tt.want)
		})
	}
}

// TestWatchedTotals: the totals of the queue and delivery show in
// /metrics as they are at each scrape.
func TestWatchedTotals(t *testing.T) {
	q := &fakeQueue{}
	d := &fakeDelivery{}
	var connsMu sync.Mutex
	conns := 0.0
	m := newMetrics(&Sources{
		Connections: func() float64 {
			connsMu.Lock()
			defer connsMu.Unlock()
			return conns
		},
		Queue:    q,
		Delivery: d,
	})
	steps := []struct {
		name string
		set  func()
		want []sample
	}{
		{"zero", func() {}, []sample{
			{"chatd_connections", "", 0},
			{"chatd_messages_stored_total", "", 0},
			{"chatd_disk_low", "", 0},
		}},
		{"every figure set", func() {
			connsMu.Lock()
			conns = 7
			connsMu.Unlock()
			q.mu.Lock()
			q.stats = queue.Stats{Stored: 11, Duplicates: 2, Full: 99, Deleted: 5, Commits: 3}
			q.undelivered, q.lsm, q.vlog, q.free, q.low = 6, 1000, 24, 4096, true
			q.mu.Unlock()
			d.mu.Lock()
			d.stats = delivery.Stats{Sent: 13, Acked: 12}
			d.mu.Unlock()
		}, []sample{
			{"chatd_connections", "", 7},
			{"chatd_messages_stored_total", "", 11},
			{"chatd_messages_deduplicated_total", "", 2},
			{"chatd_messages_deleted_total", "", 5},
			{"chatd_messages_sent_total", "", 13},
			{"chatd_messages_acked_total", "", 12},
			{"chatd_commits_total", "", 3},
			{"chatd_queue_messages", "", 6},
			{"chatd_disk_bytes", "", 1024},
			{"chatd_disk_free_bytes", "", 4096},
			{"chatd_disk_low", "", 1},
		}},
		{"read again at the next scrape", func() {
			q.mu.Lock()
			q.stats.Stored, q.low = 12, false
			q.mu.Unlock()
		}, []sample{
			{"chatd_messages_stored_total", "", 12},
			{"chatd_disk_low", "", 0},
		}},
	}
	for _, s := range steps {
		s.set()
		t.Run(s.name, func(t *testing.T) { check(t, scrape(t, m), s.want) })
	}
}

// TestEveryMetricIsTested: /metrics holds exactly the chatd metrics the
// tests above check, so a metric added without a test is noticed.
func TestEveryMetricIsTested(t *testing.T) {
	m := newMetrics(&Sources{Connections: func() float64 { return 0 }, Queue: &fakeQueue{}, Delivery: &fakeDelivery{}})
	// Vectors show only the labels used.
	m.Refused("x")
	m.Disconnected("x")
	var got []string
	for name := range scrape(t, m) {
		if strings.HasPrefix(name, "chatd_") {
			got = append(got, name)
		}
	}
	sort.Strings(got)
	want := []string{
		"chatd_commit_batch_messages", "chatd_commit_seconds", "chatd_commits_total",
		"chatd_connections", "chatd_connects_total", "chatd_delivery_seconds",
		"chatd_disconnects_total", "chatd_disk_bytes", "chatd_disk_free_bytes",
		"chatd_disk_low", "chatd_messages_acked_total", "chatd_messages_deduplicated_total",
		"chatd_messages_deleted_total", "chatd_messages_sent_total", "chatd_messages_stored_total",
		"chatd_publishes_delayed_total", "chatd_queue_messages", "chatd_refusals_total",
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("chatd metrics in /metrics:\n%v\nwant (add a new one to the tests above):\n%v", got, want)
	}
}
