package chatclient

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Pending is a message the server has not acknowledged yet.
type Pending struct {
	// Seq orders the outbox: messages go in the order they were sent.
	Seq uint64 `json:"seq"`
	// Topic is where it is published (inbox/{user} or group/{id}).
	Topic string `json:"topic"`
	// ID is the message's id, which a resend keeps: the server drops a
	// duplicate of one it stored.
	ID string `json:"id"`
	// Payload is the message object as published.
	Payload json.RawMessage `json:"payload"`
}

// Outbox keeps the messages sent and not yet acknowledged, so that they
// are sent again, with the same id, after a reconnect or a restart.
type Outbox interface {
	// Add stores p, giving it the next Seq.
	Add(p Pending) (Pending, error)
	// Remove forgets the message of seq.
	Remove(seq uint64) error
	// List returns what is pending, in Seq order.
	List() ([]Pending, error)
}

// MemoryOutbox is an Outbox that lasts as long as the process: messages
// survive reconnects, not restarts.
type MemoryOutbox struct {
	mu   sync.Mutex
	next uint64
	m    map[uint64]Pending
}

// Add implements Outbox.
func (o *MemoryOutbox) Add(p Pending) (Pending, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.m == nil {
		o.m = make(map[uint64]Pending)
	}
	o.next++
	p.Seq = o.next
	o.m[p.Seq] = p
	return p, nil
}

// Remove implements Outbox.
func (o *MemoryOutbox) Remove(seq uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	delete(o.m, seq)
	return nil
}

// List implements Outbox.
func (o *MemoryOutbox) List() ([]Pending, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]Pending, 0, len(o.m))
	for _, p := range o.m {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b Pending) int { return cmp.Compare(a.Seq, b.Seq) })
	return out, nil
}

// FileOutbox is an Outbox in a directory, one file per message written
// and synced before Add returns: messages survive a crash of the app.
// One process at a time may use a directory.
type FileOutbox struct {
	dir  string
	mu   sync.Mutex
	next uint64
}

// NewFileOutbox opens (or makes) the outbox in dir.
func NewFileOutbox(dir string) (*FileOutbox, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	o := &FileOutbox{dir: dir}
	list, err := o.List()
	if err != nil {
		return nil, err
	}
	if n := len(list); n > 0 {
		o.next = list[n-1].Seq
	}
	return o, nil
}

const outboxSuffix = ".json"

func (o *FileOutbox) path(seq uint64) string {
	return filepath.Join(o.dir, fmt.Sprintf("%020d%s", seq, outboxSuffix))
}

// Add implements Outbox: the message is on disk when it returns.
func (o *FileOutbox) Add(p Pending) (Pending, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	p.Seq = o.next + 1
	b, err := json.Marshal(p)
	if err != nil {
		return p, fmt.Errorf("outbox: %w", err)
	}
	f, err := os.CreateTemp(o.dir, "tmp-*")
	if err != nil {
		return p, fmt.Errorf("outbox: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), o.path(p.Seq))
	}
	if err != nil {
		_ = os.Remove(f.Name()) // what is left of a failed write; it is not listed either way
		return p, fmt.Errorf("outbox: %w", err)
	}
	o.next = p.Seq
	return p, nil
}

// Remove implements Outbox.
func (o *FileOutbox) Remove(seq uint64) error {
	if err := os.Remove(o.path(seq)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("outbox: %w", err)
	}
	return nil
}

// List implements Outbox.
func (o *FileOutbox) List() ([]Pending, error) {
	des, err := os.ReadDir(o.dir)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	var out []Pending
	for _, de := range des {
		name, ok := strings.CutSuffix(de.Name(), outboxSuffix)
		if !ok {
			continue
		}
		if _, err := strconv.ParseUint(name, 10, 64); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(o.dir, de.Name()))
		if err != nil {
			return nil, fmt.Errorf("outbox: %w", err)
		}
		var p Pending
		if err := json.Unmarshal(b, &p); err != nil {
			return nil, fmt.Errorf("outbox %s: %w", de.Name(), err)
		}
		out = append(out, p)
	}
	// Names are zero-padded: ReadDir's order is Seq order.
	return out, nil
}
