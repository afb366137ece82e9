// Package metrics exposes the server's Prometheus metrics. New makes the
// metrics the message path observes by event (it is built first, since
// the store and delivery report to it); Watch then adds the totals kept
// by the queue and delivery, read at scrape time, so the message path pays
// for no metric it does not need an event for. In a cluster every figure
// is this node's.
package metrics

import (
	"net/http"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/chatd/chatd/broker/msgpath/delivery"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/webhook"
)

// Queue is what the metrics read of the durable store.
type Queue interface {
	// Stats returns the store's running totals.
	Stats() queue.Stats
	// Undelivered returns the messages some device has yet to acknowledge.
	Undelivered() uint64
	// DiskSize returns the bytes the store takes on disk, in two parts.
	DiskSize() (int64, int64)
	// FreeBytes returns the free space left to the store.
	FreeBytes() int64
	// LowDisk reports whether publishes are refused for lack of space.
	LowDisk() bool
}

// Delivery is what the metrics read of delivery.
type Delivery interface {
	// Stats returns delivery's running totals.
	Stats() delivery.Stats
}

// Sources are the parts of the server the metrics read.
type Sources struct {
	// Connections returns the number of connected clients.
	Connections func() float64
	// Queue is the durable store.
	Queue Queue
	// Delivery feeds devices.
	Delivery Delivery
	// Webhooks are the webhooks' counters (push, events), by name.
	Webhooks map[string]func() webhook.Stats
	// ClusterQuorum, set in cluster mode, reports whether JetStream has a
	// quorum as this node sees it; it is asked at each scrape.
	ClusterQuorum func() bool
}

// Metrics is the server's registry and the metrics it observes by event.
type Metrics struct {
	registry *prometheus.Registry
	connects prometheus.Counter
	refusals *prometheus.CounterVec
	delayed  prometheus.Counter
	commit   prometheus.Histogram
	batch    prometheus.Histogram
	acked    prometheus.Histogram
	// disconnects counts ended connections by reason.
	disconnects *prometheus.CounterVec
}

// New registers the metrics observed by event.
func New() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		connects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "chatd_connects_total", Help: "MQTT sessions established.",
		}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "chatd_refusals_total", Help: "Publishes refused, by protocol error code.",
		}, []string{"code"}),
		delayed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "chatd_publishes_delayed_total", Help: "Publishes held back until their sender's rate budget allowed them.",
		}),
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "chatd_commit_seconds", Help: "Duration of one group commit to the queue.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 14),
		}),
		batch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "chatd_commit_batch_messages", Help: "Requests in one group commit.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 13),
		}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "chatd_disconnects_total", Help: "Connections ended, by reason (see docs/message-path.md).",
		}, []string{"reason"}),
		acked: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "chatd_delivery_seconds", Help: "From writing a message to a device to its PUBACK.",
			Buckets: prometheus.ExponentialBuckets(100e-6, 2, 16),
		}),
	}
	m.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.connects, m.refusals, m.delayed, m.commit, m.batch, m.acked, m.disconnects,
	)
	return m
}

// Build registers chatd_build_info, 1 with the build's version, commit
// and Go version as labels, so that dashboards can show what each node
// runs and alerts can join on it.
func (m *Metrics) Build(version, commit string) {
	m.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "chatd_build_info", Help: "1, labelled with the version, commit and Go version chatd was built with.",
		ConstLabels: prometheus.Labels{"version": version, "commit": commit, "go_version": runtime.Version()},
	}, func() float64 { return 1 }))
}

// Watch registers the totals read from src at scrape time. It is called
// once, when src's parts exist.
func (m *Metrics) Watch(src Sources) {
	counter := func(name, help string, f func() uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(f()) })
	}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	if src.ClusterQuorum != nil {
		m.registry.MustRegister(gauge("chatd_cluster_quorum", "1 while this node sees a JetStream quorum (its meta group has a leader and answers), 0 without: without one no message is stored.", func() float64 {
			if src.ClusterQuorum() {
				return 1
			}
			return 0
		}))
	}
	for name, stats := range src.Webhooks {
		labels := prometheus.Labels{"webhook": name}
		for _, c := range []struct {
			name, help string
			f          func(webhook.Stats) uint64
		}{
			{"chatd_webhook_sent_total", "Requests a webhook answered with a 2xx, by webhook (push, events).", func(s webhook.Stats) uint64 { return s.Sent }},
			{"chatd_webhook_failed_total", "Requests given up after a non-retryable answer or every attempt, by webhook.", func(s webhook.Stats) uint64 { return s.Failed }},
			{"chatd_webhook_retried_total", "Retries scheduled, by webhook.", func(s webhook.Stats) uint64 { return s.Retried }},
			{"chatd_webhook_dropped_total", "Requests dropped because the webhook's queue was full, by webhook.", func(s webhook.Stats) uint64 { return s.Dropped }},
		} {
			m.registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: c.name, Help: c.help, ConstLabels: labels},
				func() float64 { return float64(c.f(stats())) }))
		}
	}
	m.registry.MustRegister(
		gauge("chatd_connections", "MQTT clients connected to this node.", src.Connections),
		counter("chatd_messages_stored_total", "Messages this node stored, one per recipient.", func() uint64 { return src.Queue.Stats().Stored }),
		counter("chatd_messages_deduplicated_total", "Publishes dropped as duplicates within the dedup window.", func() uint64 { return src.Queue.Stats().Duplicates }),
		counter("chatd_messages_deleted_total", "Messages this node deleted once every device acknowledged them (in a cluster, the node that saw the last acknowledgement).", func() uint64 { return src.Queue.Stats().Deleted }),
		counter("chatd_messages_sent_total", "Messages written to devices, resends included.", func() uint64 { return src.Delivery.Stats().Sent }),
		counter("chatd_messages_acked_total", "PUBACKs received from devices.", func() uint64 { return src.Delivery.Stats().Acked }),
		counter("chatd_commits_total", "Group commits (batches of publishes written together).", func() uint64 { return src.Queue.Stats().Commits }),
		gauge("chatd_queue_messages", "Messages stored and not yet acknowledged by every device: stored minus deleted as this node counted them (in a cluster, an estimate of the node's share).", func() float64 { return float64(src.Queue.Undelivered()) }),
		gauge("chatd_disk_bytes", "Bytes the queue holds on this node's disk (Badger's LSM tree and value log; in a cluster, this node's JetStream storage).", func() float64 {
			lsm, vlog := src.Queue.DiskSize()
			return float64(lsm + vlog)
		}),
		gauge("chatd_disk_free_bytes", "Free space of the data directory's file system at the last check.", func() float64 { return float64(src.Queue.FreeBytes()) }),
		gauge("chatd_disk_low", "1 while publishes are refused because free space is under queue.min_free_bytes.", func() float64 {
			if src.Queue.LowDisk() {
				return 1
			}
			return 0
		}),
	)
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}

// Connected counts an established session.
func (m *Metrics) Connected() { m.connects.Inc() }

// Refused counts a refused publish by its protocol error code.
func (m *Metrics) Refused(code string) { m.refusals.WithLabelValues(code).Inc() }

// Delayed counts a publish held back to its sender's rate.
func (m *Metrics) Delayed() { m.delayed.Inc() }

// Committed observes one group commit.
func (m *Metrics) Committed(messages int, took time.Duration) {
	m.batch.Observe(float64(messages))
	m.commit.Observe(took.Seconds())
}

// Acked observes the delivery time of one message.
func (m *Metrics) Acked(took time.Duration) { m.acked.Observe(took.Seconds()) }

// Disconnected counts an ended connection by its reason.
func (m *Metrics) Disconnected(reason string) { m.disconnects.WithLabelValues(reason).Inc() }
