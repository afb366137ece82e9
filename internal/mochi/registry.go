package mochi

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Registry removes closed persistent connections from mochi's client map,
// which would otherwise hold every disconnected session in memory for
// device_ttl: chatd keeps a device's queue and subscription itself.
//
// mochi v2.7.9's map has no compare-and-delete, and a newer connection of
// the same client ID may be added to it at any time: a Get and Delete
// without a lock could remove the newer one, which a later takeover would
// then miss. mochi adds a connection after OnSessionEstablish, so
// Establish records it under the lock, and only the newest connection to
// pass it removes itself, under the lock too: a newer one is either
// recorded already, and nothing is removed, or waits in Establish, and is
// added after the removal. Unsubscribing happens under the lock for the
// same reason: mochi's topic tree keys subscriptions by client ID, which
// the newer connection shares.
//
// mochi answers a reconnection with Session Present only when it still
// holds the old client, so Forget keeps a small record of each session it
// removes (its user, its subscriptions and when it expires), and
// Establish resumes it for a connection of the same client ID and user
// that does not start clean: Resuming tells the CONNACK to say so, and
// Resumed hands the subscriptions to restore (Restore) after it.
//
// A connection whose CONNACK mochi fails to write gets no OnDisconnect;
// its entry stays until its client ID connects again, as the client stays
// in mochi's own map.
type Registry struct {
	mu sync.Mutex
	// newest is each client ID's latest connection to pass CONNECT.
	newest map[string]*mqtt.Client
	// resuming holds, from Establish to Resumed, the subscriptions of the
	// kept session a connection resumes; dropped the connections whose
	// device was removed (Drop, DropUser), which Forget then keeps no
	// record of. Both are rare: kept apart, they cost a connected client
	// nothing. An entry goes with its connection's Forget, Resumed, or
	// the next Establish of its client ID.
	resuming map[*mqtt.Client][]Sub
	dropped  map[*mqtt.Client]struct{}
	// anyResuming mirrors len(resuming) > 0 for AnyResuming, which is
	// asked for every packet written and must not take mu.
	anyResuming atomic.Bool
	// kept are the sessions Forget removed, by client ID.
	kept map[string]kept
	// sweepAt is the size of kept at which Forget next drops the expired
	// records: memory stays within twice the live records.
	sweepAt int
}

// kept is the record of a session Forget removed from mochi: a few dozen
// bytes and its filters, where a mochi client holds kilobytes.
type kept struct {
	// user is the session's username; a slice of the client ID when the
	// ID starts with it (chatd's do), sharing its bytes.
	user string
	// until is when the session expires, in Unix seconds.
	until int64
	subs  []Sub
}

// Sub is a subscription of a kept session, with the options chatd grants:
// no shared subscriptions and no subscription identifiers.
type Sub struct {
	Filter            string
	Qos               byte
	RetainHandling    byte
	NoLocal           bool
	RetainAsPublished bool
}

// minSweep is the fewest records before Forget sweeps expired ones.
const minSweep = 1024

// Establish records cl as the newest connection of its client ID; call it
// from OnSessionEstablish, before mochi takes over an older connection
// and adds cl to its client map. It reports whether cl resumes a session
// Forget kept: cl does not start clean, its user is the session's, the
// session has not expired at now, and mochi holds no client of the ID
// (mochi then answers itself). A clean start discards a kept session.
func (r *Registry) Establish(server *mqtt.Server, cl *mqtt.Client, now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.noteResuming()
	if r.newest == nil {
		r.newest = make(map[string]*mqtt.Client)
	}
	if old := r.newest[cl.ID]; old != nil {
		delete(r.resuming, old)
		delete(r.dropped, old)
	}
	r.newest[cl.ID] = cl
	k, ok := r.kept[cl.ID]
	if !ok {
		return false
	}
	delete(r.kept, cl.ID)
	if cl.Properties.Clean || k.until <= now.Unix() || k.user != string(cl.Properties.Username) {
		return false
	}
	if _, held := server.Clients.Get(cl.ID); held {
		return false
	}
	if r.resuming == nil {
		r.resuming = make(map[*mqtt.Client][]Sub)
	}
	r.resuming[cl] = k.subs
	return true
}

// Resuming reports whether cl is the newest connection of its ID and
// resumes a kept session; call it for cl's CONNACK.
func (r *Registry) Resuming(cl *mqtt.Client) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.resuming[cl]
	return ok && r.newest[cl.ID] == cl
}

// AnyResuming reports whether some connection resumes a kept session,
// without taking the registry's lock: the hook that sets Session Present
// asks it for every packet mochi writes, and is called with that packet
// only while a CONNACK may need it.
func (r *Registry) AnyResuming() bool { return r.anyResuming.Load() }

// noteResuming updates anyResuming after resuming changed; r.mu is held.
func (r *Registry) noteResuming() { r.anyResuming.Store(len(r.resuming) > 0) }

// Resumed returns the subscriptions of the session cl resumes, once; nil
// if it resumes none or a newer connection of its ID passed Establish.
func (r *Registry) Resumed(cl *mqtt.Client) []Sub {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.noteResuming()
	subs, ok := r.resuming[cl]
	if !ok || r.newest[cl.ID] != cl {
		return nil
	}
	delete(r.resuming, cl)
	return subs
}

// Forget removes cl from server's client map and topic tree if it is the
// newest connection of its client ID; call it from OnDisconnect. expire
// is OnDisconnect's: mochi removes a clean session itself. closing is set
// during shutdown, when mochi walks its client map holding a read lock it
// takes twice (Clients.GetByListener calls Len), so that a Delete waiting
// between the two would deadlock it; the map dies with the process then.
// A removed session is kept until now+ttl, unless ttl is not positive or
// the device was dropped (Drop, DropUser) while cl was connected.
func (r *Registry) Forget(server *mqtt.Server, cl *mqtt.Client, expire, closing bool, now time.Time, ttl time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.noteResuming()
	if r.newest[cl.ID] != cl {
		return
	}
	delete(r.newest, cl.ID)
	delete(r.resuming, cl)
	_, dropped := r.dropped[cl]
	delete(r.dropped, cl)
	if expire || cl.IsTakenOver() || closing {
		return
	}
	if ttl >= time.Second && !dropped {
		r.keep(cl, now, ttl)
	}
	server.UnsubscribeClient(cl)
	if cur, ok := server.Clients.Get(cl.ID); ok && cur == cl {
		server.Clients.Delete(cl.ID)
	}
}

// keep records cl's session; r.mu is held.
func (r *Registry) keep(cl *mqtt.Client, now time.Time, ttl time.Duration) {
	if r.kept == nil {
		r.kept = make(map[string]kept)
	}
	if len(r.kept) >= r.sweepAt {
		r.sweep(now)
		r.sweepAt = max(2*len(r.kept), minSweep)
	}
	user := string(cl.Properties.Username)
	if strings.HasPrefix(cl.ID, user) {
		user = cl.ID[:len(user)]
	}
	all := cl.State.Subscriptions.GetAll()
	var subs []Sub
	if len(all) > 0 {
		subs = make([]Sub, 0, len(all))
		for _, s := range all {
			subs = append(subs, Sub{
				Filter: s.Filter, Qos: s.Qos, RetainHandling: s.RetainHandling,
				NoLocal: s.NoLocal, RetainAsPublished: s.RetainAsPublished,
			})
		}
	}
	r.kept[cl.ID] = kept{user: user, until: now.Add(ttl).Unix(), subs: subs}
}

// sweep drops the records expired at now; r.mu is held.
func (r *Registry) sweep(now time.Time) {
	t := now.Unix()
	for id, k := range r.kept {
		if k.until <= t {
			delete(r.kept, id)
		}
	}
}

// Drop discards the kept session of clientID, and any its connected
// client would leave: call it when the device is removed or its session
// moves to another node.
func (r *Registry) Drop(clientID string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.noteResuming()
	delete(r.kept, clientID)
	if cl := r.newest[clientID]; cl != nil {
		r.drop(cl)
	}
}

// DropUser discards the kept sessions of user, and any its connected
// clients would leave: call it when the user is erased. It scans every
// record, which erasures are rare enough to afford.
func (r *Registry) DropUser(user string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.noteResuming()
	for id, k := range r.kept {
		if k.user == user {
			delete(r.kept, id)
		}
	}
	for _, cl := range r.newest {
		if string(cl.Properties.Username) == user {
			r.drop(cl)
		}
	}
}

// drop marks cl's device dropped: it resumes nothing and leaves no
// record; r.mu is held.
func (r *Registry) drop(cl *mqtt.Client) {
	delete(r.resuming, cl)
	if r.dropped == nil {
		r.dropped = make(map[*mqtt.Client]struct{})
	}
	r.dropped[cl] = struct{}{}
}

// Kept returns how many sessions the registry keeps, expired ones not yet
// swept included.
func (r *Registry) Kept() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.kept)
}

// Restore subscribes cl, in server's topic tree and its own state, to the
// subscriptions of the session it resumed, as mochi's
// inheritClientSession does when it takes over a client it still holds.
// It runs no subscribe hook: the caller starts what a SUBSCRIBE would.
func Restore(server *mqtt.Server, cl *mqtt.Client, subs []Sub) {
	for _, s := range subs {
		sub := packets.Subscription{
			Filter: s.Filter, Qos: s.Qos, RetainHandling: s.RetainHandling,
			NoLocal: s.NoLocal, RetainAsPublished: s.RetainAsPublished,
		}
		if server.Topics.Subscribe(cl.ID, sub) {
			atomic.AddInt64(&server.Info.Subscriptions, 1)
		}
		cl.State.Subscriptions.Add(sub.Filter, sub)
	}
}
