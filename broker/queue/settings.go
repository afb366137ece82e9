package queue

import "time"

// Settings are the queue settings both backends read (config's queue
// section, less what is a backend's own: Badger's sync mode and disk
// reserve).
type Settings struct {
	// MessageTTL is how long an undelivered message is kept.
	MessageTTL time.Duration
	// DedupWindow is how long a (sender, id) pair is remembered.
	DedupWindow time.Duration
	// MaxQueueMessages caps one user's queue.
	MaxQueueMessages int
	// DeviceTTL forgets a device unseen for this long.
	DeviceTTL time.Duration
	// MaxDevices caps one user's known devices.
	MaxDevices int
	// AckFlushInterval is how often acknowledged cursors are persisted
	// and delivered messages deleted.
	AckFlushInterval time.Duration
	// MaxBatch caps the number of messages in one group commit.
	MaxBatch int
}

// DefaultSettings returns the queue's defaults: config.Default's queue
// section takes them, a backend fills in what its caller left zero with
// them, and tests start from them.
func DefaultSettings() Settings {
	return Settings{
		MessageTTL:       30 * 24 * time.Hour,
		DedupWindow:      24 * time.Hour,
		MaxQueueMessages: 1_000_000,
		DeviceTTL:        30 * 24 * time.Hour,
		MaxDevices:       32,
		AckFlushInterval: 10 * time.Millisecond,
		MaxBatch:         4096,
	}
}
