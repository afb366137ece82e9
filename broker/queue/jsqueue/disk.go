package jsqueue

import (
	"errors"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// freeInterval is how often the account's JetStream storage is read.
const freeInterval = 5 * time.Second

// FreeBytes returns the JetStream storage the account may still use, as
// last read, or -1 when the account has no storage limit of its own (the
// servers' max_store then applies, which a client cannot see).
func (s *Store) FreeBytes() int64 { return s.free.Load() }

// LowDisk reports whether JetStream refused the last message it refused
// for lack of storage and has stored nothing since. Unlike badgerq,
// which watches its disk and keeps a reserve, the JetStream servers
// enforce their own limits; this only mirrors what they answered.
func (s *Store) LowDisk() bool { return s.lowDisk.Load() }

// readFree refreshes FreeBytes from the account's JetStream usage.
func (s *Store) readFree() {
	ctx, cancel := s.reqCtx()
	defer cancel()
	info, err := s.js.AccountInfo(ctx)
	if err != nil {
		s.log.Error("read JetStream storage use", "error", err)
		return
	}
	if info.Limits.MaxStore <= 0 {
		s.free.Store(-1)
		return
	}
	s.free.Store(max(info.Limits.MaxStore-int64(info.Store), 0))
}

// noteSpace updates LowDisk from one request's outcome.
func (s *Store) noteSpace(stored bool, err error) {
	switch {
	case errors.Is(err, queue.ErrNoSpace):
		if !s.lowDisk.Swap(true) {
			s.log.Error("JetStream is out of storage: messages are refused", "error", err)
		}
	case stored:
		if s.lowDisk.Swap(false) {
			s.log.Info("JetStream stores messages again")
		}
	}
}
