package mochi

import (
	"sync"

	mqtt "github.com/mochi-mqtt/server/v2"
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
// A connection whose CONNACK mochi fails to write gets no OnDisconnect;
// its entry stays until its client ID connects again, as the client stays
// in mochi's own map.
type Registry struct {
	mu sync.Mutex
	// newest is each client ID's latest connection to pass CONNECT.
	newest map[string]*mqtt.Client
}

// Establish records cl as the newest connection of its client ID; call it
// from OnSessionEstablish, before mochi takes over an older connection
// and adds cl to its client map.
func (r *Registry) Establish(cl *mqtt.Client) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.newest == nil {
		r.newest = make(map[string]*mqtt.Client)
	}
	r.newest[cl.ID] = cl
}

// Forget removes cl from server's client map and topic tree if it is the
// newest connection of its client ID; call it from OnDisconnect. expire
// is OnDisconnect's: mochi removes a clean session itself. closing is set
// during shutdown, when mochi walks its client map holding a read lock it
// takes twice (Clients.GetByListener calls Len), so that a Delete waiting
// between the two would deadlock it; the map dies with the process then.
func (r *Registry) Forget(server *mqtt.Server, cl *mqtt.Client, expire, closing bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.newest[cl.ID] != cl {
		return
	}
	delete(r.newest, cl.ID)
	if expire || cl.IsTakenOver() || closing {
		return
	}
	server.UnsubscribeClient(cl)
	if cur, ok := server.Clients.Get(cl.ID); ok && cur == cl {
		server.Clients.Delete(cl.ID)
	}
}
