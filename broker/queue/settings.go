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

// WithDefaults returns s with every field that is zero or less set to
// DefaultSettings': none has a meaning at zero (config refuses zero for
// all of them), so an unset field means the default.
func (s Settings) WithDefaults() Settings {
	def := DefaultSettings()
	fill := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	fillInt := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	fill(&s.MessageTTL, def.MessageTTL)
	fill(&s.DedupWindow, def.DedupWindow)
	fillInt(&s.MaxQueueMessages, def.MaxQueueMessages)
	fill(&s.DeviceTTL, def.DeviceTTL)
	fillInt(&s.MaxDevices, def.MaxDevices)
	fill(&s.AckFlushInterval, def.AckFlushInterval)
	fillInt(&s.MaxBatch, def.MaxBatch)
	return s
}
