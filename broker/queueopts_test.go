package broker

import (
	"testing"
	"time"

	"github.com/chatd/chatd/config"
)

// TestJetStreamSync checks how queue.sync maps onto JetStream's fsync
// (natsnode's TestQueueSyncReachesJetStream checks that the server takes it).
func TestJetStreamSync(t *testing.T) {
	cases := []struct {
		sync         string
		interval     time.Duration
		wantAlways   bool
		wantInterval time.Duration
	}{
		{config.SyncAlways, 100 * time.Millisecond, true, 0},
		{config.SyncBatch, 100 * time.Millisecond, false, 100 * time.Millisecond},
		{config.SyncBatch, 3 * time.Second, false, 3 * time.Second},
		{config.SyncNone, 100 * time.Millisecond, false, 0},
	}
	for _, c := range cases {
		q := config.Default().Queue
		q.Sync, q.SyncInterval = c.sync, c.interval
		always, interval := jetstreamSync(q)
		if always != c.wantAlways || interval != c.wantInterval {
			t.Errorf("%s/%v: always=%v interval=%v, want %v %v", c.sync, c.interval, always, interval, c.wantAlways, c.wantInterval)
		}
	}
}

// TestClusterAckFlush: in cluster mode acknowledgements are flushed at
// cluster.ack_flush_interval, not at Badger's queue.ack_flush_interval.
func TestClusterAckFlush(t *testing.T) {
	cfg := config.Default()
	if got := queueSettings(cfg.Queue).AckFlushInterval; got != cfg.Queue.AckFlushInterval {
		t.Errorf("one node: %v, want queue.ack_flush_interval %v", got, cfg.Queue.AckFlushInterval)
	}
	if got := clusterQueueSettings(cfg).AckFlushInterval; got != 500*time.Millisecond {
		t.Errorf("cluster: %v, want cluster.ack_flush_interval's default 500ms", got)
	}
}
