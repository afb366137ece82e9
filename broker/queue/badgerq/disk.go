package badgerq

import (
	"fmt"
	"syscall"
	"time"
)

// diskCheckInterval is how often free space is read: at the server's
// write rate, far less than the reserve is written in between.
const diskCheckInterval = 250 * time.Millisecond

// freeBytes returns the bytes of dir's file system an unprivileged writer may use.
func freeBytes(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// checkDisk reads the free space and switches the store in or out of its
// low-disk state, logging each switch once.
//
// Badger writes through memory-mapped files, so a file system that really
// fills up faults the process instead of failing a write: new messages
// stop at the reserve, which leaves room for what must go on (cursors,
// deletes, receipts of messages already stored, compaction).
func (s *Store) checkDisk() {
	free, err := freeBytes(s.opts.Dir)
	if err != nil {
		s.log.Error("read free disk space", "error", err)
		return
	}
	s.free.Store(free)
	low := free < s.opts.MinFreeBytes
	if s.lowDisk.Swap(low) == low {
		return
	}
	if low {
		s.log.Error("disk space low: refusing new messages until space is freed",
			"dir", s.opts.Dir, "free_bytes", free, "min_free_bytes", s.opts.MinFreeBytes)
	} else {
		s.log.Info("disk space recovered: accepting messages again", "dir", s.opts.Dir, "free_bytes", free)
	}
}

// FreeBytes returns the free space of the store's file system at the last check.
func (s *Store) FreeBytes() int64 { return s.free.Load() }

// LowDisk reports whether the store refuses new messages for lack of disk space.
func (s *Store) LowDisk() bool { return s.lowDisk.Load() }
