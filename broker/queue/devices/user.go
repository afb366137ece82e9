package devices

import (
	"iter"
	"maps"
	"slices"
	"sync"
)

// User is what a registry knows of one user: its devices, the records to
// delete, and the backend's queue state Q, all under the user's lock.
type User[Q any] struct {
	// Name is the user ID.
	Name string
	// Queue is the backend's state of the user's queue; only read or
	// written with the user locked.
	Queue Q

	mu sync.Mutex
	// devices are the user's known devices (on any node, for a shared
	// persister).
	devices map[string]*Device
	// forgotten lists devices whose records the next flush deletes.
	forgotten []Forget
	// evicted is set when the user is dropped from memory: whoever finds
	// it so loads the user again (Registry.Lock).
	evicted bool
	// used is set whenever the user is locked, and cleared by each
	// eviction pass: one that finds it clear evicts the user.
	used bool
	// loading is closed once the user is read from the persister.
	loading chan struct{}
}

// Device is one device's record, what of it the persister holds, and its
// connections to this node.
type Device struct {
	Record
	// Saved is the record as the persister holds it.
	Saved Record
	// Rev is Saved's revision in the persister; 0 when it holds none
	// (never written, or deleted since).
	Rev uint64
	// Online counts the device's open connections here (a takeover
	// briefly has two).
	Online int
}

// Forget is a device record to delete, unless it changed after Rev (a
// shared persister: another node saw the device since); 0 deletes
// whatever is there.
type Forget struct {
	Name string
	Rev  uint64
}

// Write is a device record a flush persists, over revision Rev.
type Write struct {
	Name   string
	Record Record
	Rev    uint64
}

// Stored is one device record as the persister read it.
type Stored struct {
	Record Record
	// Rev is the record's revision; never 0.
	Rev uint64
	// Deleted is a deletion marker (a shared persister keeps them).
	Deleted bool
}

// loaded reports whether u has been read from the persister.
func (u *User[Q]) loaded() bool {
	select {
	case <-u.loading:
		return true
	default:
		return false
	}
}

// Lock locks the user.
func (u *User[Q]) Lock() { u.mu.Lock() }

// Unlock unlocks the user.
func (u *User[Q]) Unlock() { u.mu.Unlock() }

// Device returns the state of device name; called with u locked.
func (u *User[Q]) Device(name string) (*Device, bool) {
	d, ok := u.devices[name]
	return d, ok
}

// Devices lists the user's devices by name; called with u locked.
func (u *User[Q]) Devices() iter.Seq2[string, *Device] { return maps.All(u.devices) }

// DeviceCount returns how many devices the user has; called with u locked.
func (u *User[Q]) DeviceCount() int { return len(u.devices) }

// HasPersistent reports whether the user has a device that is not
// transient; called with u locked.
func (u *User[Q]) HasPersistent() bool {
	for _, d := range u.devices {
		if !d.Transient {
			return true
		}
	}
	return false
}

// MinCursor is the sequence every device has acknowledged; ok is false
// when the user has no persistent device. A transient device holds
// messages back while it is connected, but it cannot release them alone:
// they wait for the user's first persistent device. Called with u locked.
func (u *User[Q]) MinCursor() (uint64, bool) {
	if !u.HasPersistent() {
		return 0, false
	}
	m := ^uint64(0)
	for _, d := range u.devices {
		m = min(m, d.Cursor)
	}
	return m, true
}

// MaxCursor is the largest cursor of the user's devices, 0 without
// devices; called with u locked.
func (u *User[Q]) MaxCursor() uint64 {
	var m uint64
	for _, d := range u.devices {
		m = max(m, d.Cursor)
	}
	return m
}

// Written records that rec was persisted as device name's record at
// revision rev. It reports whether the device is still known, and
// whether its record changed meanwhile and must be written again. A
// shared persister's write may have merged in a larger cursor from
// another node, which the device takes. Called with u locked.
func (u *User[Q]) Written(name string, rec Record, rev uint64) (here, changed bool) {
	d, ok := u.devices[name]
	if !ok {
		return false, false
	}
	d.Saved, d.Rev = rec, rev
	d.Cursor = max(d.Cursor, rec.Cursor)
	return true, d.Record != d.Saved
}

// ForgetLater adds fs to the records the next flush deletes, for a flush
// that failed to delete them; called with u locked.
func (u *User[Q]) ForgetLater(fs ...Forget) {
	u.forgotten = append(u.forgotten, fs...)
}

// isForgotten reports whether name awaits deletion; called with u locked.
func (u *User[Q]) isForgotten(name string) bool {
	return slices.ContainsFunc(u.forgotten, func(f Forget) bool { return f.Name == name })
}

// unforget drops name from the pending deletions, for a device that came
// back before them; called with u locked.
func (u *User[Q]) unforget(name string) {
	u.forgotten = slices.DeleteFunc(u.forgotten, func(f Forget) bool { return f.Name == name })
}
