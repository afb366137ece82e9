package broker

import (
	"time"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/config"
)

// queueSettings is the part of config's queue section both queue
// backends read.
func queueSettings(q config.Queue) queue.Settings {
	return queue.Settings{
		MessageTTL:       q.MessageTTL,
		DedupWindow:      q.DedupWindow,
		MaxQueueMessages: q.MaxQueueMessages,
		DeviceTTL:        q.DeviceTTL,
		MaxDevices:       q.MaxDevices,
		AckFlushInterval: q.AckFlushInterval,
		MaxBatch:         q.MaxBatch,
	}
}

// clusterQueueSettings is queueSettings for JetStream: acknowledgements
// are flushed every cluster.ack_flush_interval.
func clusterQueueSettings(cfg config.Config) queue.Settings {
	s := queueSettings(cfg.Queue)
	s.AckFlushInterval = cfg.Cluster.AckFlushInterval
	return s
}

// badgerSync is Badger's sync mode for queue.sync. Config.Validate
// admits only the three modes; anything else fsyncs every commit.
func badgerSync(mode string) badgerq.Sync {
	switch mode {
	case config.SyncBatch:
		return badgerq.SyncBatch
	case config.SyncNone:
		return badgerq.SyncNone
	default:
		return badgerq.SyncAlways
	}
}

// jetstreamSync maps queue.sync and queue.sync_interval onto the embedded
// NATS server's fsync settings, so that a PUBACK means in cluster mode
// what the mode says on a single node:
//   - always: every JetStream write is fsynced before it is acknowledged;
//   - batch: JetStream fsyncs every q.SyncInterval, as Badger does;
//   - none: JetStream cannot be told never to fsync, so it keeps its own
//     natsnode.DefaultSyncInterval (interval 0), the closest to leaving
//     flushes to the OS.
//
// A server chatd joins by URL keeps its own settings: it is not ours to set.
func jetstreamSync(q config.Queue) (always bool, interval time.Duration) {
	switch q.Sync {
	case config.SyncAlways:
		return true, 0
	case config.SyncBatch:
		return false, q.SyncInterval
	default:
		return false, 0
	}
}
