package broker

import (
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
