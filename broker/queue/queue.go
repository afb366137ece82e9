// Package queue is the contract of chatd's durable per-user queues: the
// message types, and the Store that both backends implement (badgerq on
// one node, jsqueue in a cluster). queuetest is the conformance suite
// both run.
//
// Guarantees every Store gives: a message passed to Append is durable (per
// the sync mode) before its Done reports Stored; messages of one user are
// numbered in the order they were committed, from 1; a message stays until
// every device of its user has acknowledged it, or until it expires.
package queue

import (
	"errors"
	"strconv"
	"sync/atomic"
	"time"
)

// ErrNoSpace is the error of a publish refused because data_dir's file
// system has less than queue.min_free_bytes free.
var ErrNoSpace = errors.New("the server's disk is full")

// ErrUnknownDevice is the error of an operation on a device its user
// does not have.
var ErrUnknownDevice = errors.New("no such device")

// Device is what a store knows of one device of a user.
type Device struct {
	// Name is the device's name: "" for the bare {user} client ID.
	Name string
	// Cursor is the last sequence the device acknowledged.
	Cursor uint64
	// Seen is when the device was last seen connecting or leaving; a
	// device connected for long is seen again at each unseen-device sweep.
	Seen time.Time
	// Transient marks a clean-session device.
	Transient bool
	// Connected reports whether the device has a connection to this node.
	Connected bool
}

// Message is one queued envelope and its position in its user's queue.
type Message struct {
	// Seq is the message's position in its user's queue, from 1.
	Seq uint64
	// Meta is what the caller stored beside the envelope for itself (who
	// to send a delivered receipt to); it is never delivered.
	Meta []byte
	// Data is the envelope delivered to the user's devices.
	Data []byte
}

// Status is the outcome of an Append.
type Status int

// Append outcomes.
const (
	// Stored means the message is durable and will be delivered.
	Stored Status = iota
	// Duplicate means the (sender, id) pair was seen within the dedup window; nothing was stored.
	Duplicate
	// Full means the recipient's queue is at max_queue_messages; nothing was stored.
	Full
	// Failed means the commit failed; nothing was stored.
	Failed
	// Passed is the outcome of a request with no recipient, used to keep acknowledgements in order.
	Passed
)

// Request asks for one message to be stored.
type Request struct {
	// To is the recipient user; "" makes the request an ordering barrier that stores nothing.
	To string
	// Sender and ID form the dedup key; an empty ID disables dedup (server-made events).
	Sender, ID string
	// Meta is stored beside Data and handed back with the message.
	Meta []byte
	// Data is the envelope to store.
	Data []byte
	// Fanout lists more recipients of the same message (a group message),
	// each with its own envelope, stored in the same commit under the one
	// dedup key. A full queue skips that recipient alone; when every
	// recipient's queue is full the request is Full and no dedup key is
	// written, so the sender's retry is not taken for a duplicate.
	Fanout []Fanout
	// OnFull, if set, is called before Done of a Stored request with the
	// recipients whose queues were full and got nothing, on the committer
	// goroutine; it must not block.
	OnFull func(users []string)
	// Done is called once, on the committer goroutine, in the order requests
	// were made. It must not block.
	Done func(Status, Message, error)
	// OnStored, if set, is called after Done for every copy the request
	// stored (To's and each Fanout's), on the committer goroutine, once
	// the copy is durable; it must not block. The message path uses it to
	// wake the recipients' devices.
	OnStored func(user string, m Message)
}

// Fanout is one more recipient of a Request.
type Fanout struct {
	// To is the recipient user.
	To string
	// Data is the envelope for that recipient.
	Data []byte
	// Meta, if not nil, is stored with this copy instead of the Request's.
	Meta []byte
	// Own marks a copy for the sender's own devices (a sent copy): it is
	// stored with the message, in the same commit, and never counts as a
	// recipient: a full queue skips it silently, it decides no Status and
	// OnFull never names it. A backend may skip it when the user has no
	// device but the sender's (badgerq does), and may store it for a
	// message every recipient's full queue refused (jsqueue does).
	Own bool
}

// MetaOf returns the Meta stored with f: its own, else the request's.
func (f Fanout) MetaOf(r *Request) []byte {
	if f.Meta != nil {
		return f.Meta
	}
	return r.Meta
}

// DeletedFunc is told of messages of user deleted because every device
// of user acknowledged them (not of those erased or expired), with their
// Seq and Meta (no Data), in order, after the deletion is durable. A
// store given one reads the Meta of what it deletes, which it otherwise
// skips; it calls it on its flushing goroutine, and it must not block.
type DeletedFunc func(user string, msgs []Message)

// Stats are the store's running totals.
type Stats struct {
	// Stored counts messages stored, one per recipient.
	Stored uint64
	// Duplicates counts publishes dropped by the dedup window.
	Duplicates uint64
	// Full counts messages refused by a full queue.
	Full uint64
	// Deleted counts messages deleted once acknowledged by every device.
	Deleted uint64
	// Commits counts group commits.
	Commits uint64
}

// Counters are a store's running totals, updated concurrently.
type Counters struct {
	Stored, Duplicates, Full, Deleted, Commits atomic.Uint64
}

// Stats returns the totals as they are now.
func (c *Counters) Stats() Stats {
	return Stats{
		Stored:     c.Stored.Load(),
		Duplicates: c.Duplicates.Load(),
		Full:       c.Full.Load(),
		Deleted:    c.Deleted.Load(),
		Commits:    c.Commits.Load(),
	}
}

// Undelivered returns how many stored messages are not deleted yet.
func (st Stats) Undelivered() uint64 {
	if st.Deleted > st.Stored {
		return 0
	}
	return st.Stored - st.Deleted
}

// Store is the contract of a durable queue backend, as the server and the
// message path use it. queuetest.RunExamples and queuetest.RunModel check
// an implementation against it.
type Store interface {
	// Append queues r for the committer; r.Done reports the outcome. It
	// blocks while the committer is saturated, which slows every publisher.
	Append(r *Request)
	// TryAppend queues r unless the committer is saturated.
	TryAppend(r *Request) bool
	// Read returns up to max messages of user with Seq > after, in order.
	Read(user string, after uint64, max int) ([]Message, error)
	// Head returns the last committed sequence of user.
	Head(user string) (uint64, error)
	// Depth returns how many messages wait in user's queue.
	Depth(user string) (uint64, error)
	// Waiting counts the messages of user with Seq > after.
	Waiting(user string, after uint64) (uint64, error)
	// MayAttach reports whether a device may connect under max_devices.
	MayAttach(user, device string) (bool, error)
	// Attach registers a connection of a device and returns its cursor and
	// whether it was subscribed to its inbox before.
	Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error)
	// Cursor returns the last sequence a registered device acknowledged.
	Cursor(user, device string) (uint64, error)
	// SetSubscribed records whether a device is subscribed to its inbox.
	SetSubscribed(user, device string, subscribed bool)
	// Ack records that device has acknowledged everything up to cursor.
	Ack(user, device string, cursor uint64)
	// Detach records that a connection of a device ended.
	Detach(user, device string)
	// Devices lists the devices of user, by name.
	Devices(user string) ([]Device, error)
	// Remove forgets a device of user at once, connected or not, and
	// deletes what the user's other devices have all acknowledged; it
	// returns ErrUnknownDevice if the user has no such device. The
	// caller closes the device's connections.
	Remove(user, device string) error
	// Erase forgets user at once (an account deleted): every device,
	// connected or not, every message in its queue, and the dedup keys
	// of what it sent where the backend keeps its own (badgerq; JetStream
	// forgets its message ids after dedup_window). It returns the devices
	// it forgot, whose connections the caller closes; what the user is
	// sent afterwards is queued as for a new user.
	Erase(user string) ([]string, error)
	// Stats returns the store's running totals.
	Stats() Stats
	// Undelivered returns how many stored messages are not deleted yet.
	Undelivered() uint64
	// DiskSize returns the bytes the store holds on this node's disk.
	DiskSize() (lsm, vlog int64)
	// FreeBytes returns the free bytes of the store's file system.
	FreeBytes() int64
	// LowDisk reports whether publishes are refused for lack of disk space.
	LowDisk() bool
	// Close lets the committer finish what was accepted and closes the store.
	Close() error
}

// String names a Status, for logs and test failures.
func (s Status) String() string {
	switch s {
	case Stored:
		return "stored"
	case Duplicate:
		return "duplicate"
	case Full:
		return "full"
	case Failed:
		return "failed"
	case Passed:
		return "passed"
	}
	return "status(" + strconv.Itoa(int(s)) + ")"
}
