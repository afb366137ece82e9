// Package presence tracks whether each user has a device online and
// publishes it, retained, on presence/{user}; the last state of every user
// is kept in Badger so that it survives a restart.
package presence

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/envelope"
	"github.com/chatd/chatd/broker/topic"
)

// keyTag prefixes presence records in the shared Badger database.
const keyTag = 'p'

// Publisher publishes a retained message, as the server.
type Publisher func(topic string, payload []byte, retain bool, qos byte) error

// Tracker counts each user's connections and publishes transitions.
// Connections are counted, not devices, so a session takeover (the new
// connection arrives before the old one leaves) never shows "offline".
type Tracker struct {
	db      *badger.DB
	publish Publisher
	log     *slog.Logger
	now     func() time.Time

	mu    sync.Mutex
	conns map[string]int
}

// New returns a Tracker storing in db and publishing with publish.
func New(db *badger.DB, publish Publisher, log *slog.Logger) *Tracker {
	return &Tracker{db: db, publish: publish, log: log, now: time.Now, conns: make(map[string]int)}
}

// Restore publishes every stored presence after a start. Users who were
// online when the server stopped, cleanly or not, are shown offline from
// now: their connections did not survive.
func (t *Tracker) Restore() error {
	now := t.now().UnixMilli()
	type rec struct {
		user   string
		online bool
		ts     int64
	}
	var recs []rec
	err := t.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyTag}, PrefetchValues: true, PrefetchSize: 100})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			v, err := item.ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("read presence: %w", err)
			}
			online, ts, ok := decode(v)
			user := string(item.Key()[1:])
			if !ok || !topic.ValidUser(user) {
				return fmt.Errorf("presence record of %q is corrupt", user)
			}
			recs = append(recs, rec{user, online, ts})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("restore presence: %w", err)
	}
	for _, r := range recs {
		if r.online {
			r.online, r.ts = false, now
			if err := t.store(r.user, false, now); err != nil {
				return fmt.Errorf("restore presence of %s: %w", r.user, err)
			}
		}
		if err := t.publish(topic.PresencePrefix+r.user, envelope.Presence(r.user, false, r.ts), true, 0); err != nil {
			return fmt.Errorf("publish presence of %s: %w", r.user, err)
		}
	}
	return nil
}

// Connected records a new connection of user; the first one makes it online.
func (t *Tracker) Connected(user string) {
	t.mu.Lock()
	t.conns[user]++
	first := t.conns[user] == 1
	if first {
		t.announce(user, true)
	}
	t.mu.Unlock()
}

// Disconnected records a closed connection of user; the last one makes it
// offline, last seen now.
func (t *Tracker) Disconnected(user string) {
	t.mu.Lock()
	t.conns[user]--
	last := t.conns[user] <= 0
	if last {
		delete(t.conns, user)
		t.announce(user, false)
	}
	t.mu.Unlock()
}

// announce stores and publishes a transition; called with t.mu held so
// that transitions of a user are published in the order they happened.
func (t *Tracker) announce(user string, online bool) {
	ts := t.now().UnixMilli()
	if err := t.store(user, online, ts); err != nil {
		t.log.Error("store presence", "user", user, "error", err)
	}
	if err := t.publish(topic.PresencePrefix+user, envelope.Presence(user, online, ts), true, 0); err != nil {
		t.log.Error("publish presence", "user", user, "error", err)
	}
}

func (t *Tracker) store(user string, online bool, ts int64) error {
	return t.db.Update(func(txn *badger.Txn) error {
		return txn.Set(append([]byte{keyTag}, user...), encode(online, ts))
	})
}

func encode(online bool, ts int64) []byte {
	b := make([]byte, 9)
	if online {
		b[0] = 1
	}
	binary.BigEndian.PutUint64(b[1:], uint64(ts))
	return b
}

func decode(v []byte) (online bool, ts int64, ok bool) {
	if len(v) != 9 {
		return false, 0, false
	}
	return v[0] == 1, int64(binary.BigEndian.Uint64(v[1:])), true
}
