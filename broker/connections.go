package broker

import (
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/chatd/chatd/broker/cluster/peers"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/hooks"
)

// peerAnswerWait bounds how long a devices list waits for the other
// nodes to say which devices are connected to them.
const peerAnswerWait = time.Second

// connections are the devices' connections on this node and, in
// cluster mode, on its peers, as the devices API sees them.
type connections struct {
	mqtt *mqtt.Server
	// bus is nil on one node.
	bus *peers.Bus
	// inbox keeps the node's closed sessions.
	inbox *hooks.Inbox
}

// conns returns the node's connections.
func (s *Server) conns() connections {
	c := connections{mqtt: s.mqtt, inbox: s.inbox}
	if s.cluster != nil {
		c.bus = s.cluster.bus
	}
	return c
}

// Connected returns which of clientIDs have a connection here or on a
// peer; err names the peers that did not answer.
func (c connections) Connected(clientIDs []string) (map[string]bool, error) {
	found := make(map[string]bool)
	var err error
	if c.bus != nil {
		found, err = c.bus.Connected(clientIDs, peerAnswerWait)
	}
	for _, id := range c.connectedHere(clientIDs) {
		found[id] = true
	}
	return found, err
}

// connectedHere returns which of clientIDs have a connection here.
func (c connections) connectedHere(clientIDs []string) []string {
	var out []string
	for _, id := range clientIDs {
		if cl, ok := c.mqtt.Clients.Get(id); ok && !cl.Closed() {
			out = append(out, id)
		}
	}
	return out
}

// Removed ends the connections of a device its user removed, here and
// on the peers.
func (c connections) Removed(user, device string) {
	if c.bus != nil {
		c.bus.DeviceRemoved(user, device)
	}
	// The device starts anew: it resumes no session.
	c.inbox.DropSession(topic.ClientID(user, device))
	endHere(c.mqtt, topic.ClientID(user, device), hooks.ErrDeviceRemoved)
}

// endHere ends the connection of clientID here, if it has one, for cause
// (hooks.EndAdministrative).
func endHere(s *mqtt.Server, clientID string, cause error) {
	if cl, ok := s.Clients.Get(clientID); ok && !cl.Closed() {
		hooks.EndAdministrative(s, cl, cause)
	}
}

// Moderated ends the connections a backend disconnected, here and on the
// peers: device of user, or every device of user when all is set.
func (c connections) Moderated(user, device string, all bool) {
	if c.bus != nil {
		c.bus.Moderated(user, device, all)
	}
	c.endModeratedHere(user, device, all)
}

// Erased ends every connection of an erased user, here and on the peers,
// which also forget its last-seen time.
func (c connections) Erased(user string) {
	if c.bus != nil {
		c.bus.Erased(user)
	}
	c.inbox.DropUser(user)
	c.endModeratedHere(user, "", true)
}

// endModeratedHere ends, on this node, the connection of device of user,
// or of every device of user when all is set.
func (c connections) endModeratedHere(user, device string, all bool) {
	if !all {
		endHere(c.mqtt, topic.ClientID(user, device), hooks.ErrModerated)
		return
	}
	// Moderation is rare: a scan of the node's clients beats an index
	// kept up to date on every connect.
	for _, cl := range c.mqtt.Clients.GetAll() {
		if string(cl.Properties.Username) == user && !cl.Closed() {
			hooks.EndAdministrative(c.mqtt, cl, hooks.ErrModerated)
		}
	}
}
