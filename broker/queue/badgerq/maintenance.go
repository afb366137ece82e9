package badgerq

import (
	"errors"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// gcInterval is how often the value log is garbage collected.
const gcInterval = time.Minute

// maintenanceLoop fsyncs in batch mode, watches free disk space and
// reclaims value-log space.
func (s *Store) maintenanceLoop() {
	defer s.wg.Done()
	var syncC <-chan time.Time
	if s.opts.Sync == SyncBatch {
		t := time.NewTicker(s.opts.SyncInterval)
		defer t.Stop()
		syncC = t.C
	}
	gc := time.NewTicker(gcInterval)
	defer gc.Stop()
	disk := time.NewTicker(diskCheckInterval)
	defer disk.Stop()
	for {
		select {
		case <-disk.C:
			s.checkDisk()
		case <-syncC:
			if err := s.db.Sync(); err != nil {
				s.log.Error("periodic fsync", "error", err)
			}
		case <-gc.C:
			s.collectGarbage()
		case <-s.stop:
			return
		}
	}
}

// collectGarbage rewrites value-log files that are mostly deleted messages.
func (s *Store) collectGarbage() {
	for {
		err := s.db.RunValueLogGC(0.5)
		if err == nil {
			continue
		}
		if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) {
			s.log.Error("value log gc", "error", err)
		}
		return
	}
}
