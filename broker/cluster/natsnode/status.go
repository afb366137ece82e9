package natsnode

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Status is what JetStream says of the cluster's health: its meta group,
// which places streams, and every stream's Raft group.
type Status struct {
	// Meta is the meta group, as the embedded server knows it (its
	// replicas only on the meta leader's node); nil when joined by URL.
	Meta *Group `json:"meta,omitempty"`
	// Streams are the account's streams (queues, device records, groups,
	// media), by name.
	Streams []Group `json:"streams"`
}

// Group is one Raft group: the meta group or a stream's.
type Group struct {
	// Name is the stream's name, or "meta".
	Name string `json:"name"`
	// Leader is the server that leads the group; "" when it has none, as
	// when a majority of its replicas is down.
	Leader string `json:"leader"`
	// Replicas are the group's other servers.
	Replicas []Replica `json:"replicas"`
	// Messages is how many messages a stream holds.
	Messages uint64 `json:"messages,omitempty"`
}

// Replica is a server of a group other than its leader.
type Replica struct {
	// Name is the server's name.
	Name string `json:"name"`
	// Current reports whether it is caught up and seen lately.
	Current bool `json:"current"`
	// Offline reports whether it has not been seen lately.
	Offline bool `json:"offline,omitempty"`
	// Lag is how many operations behind the leader it is.
	Lag uint64 `json:"lag"`
	// SeenMs is how long ago the leader last heard of it, in milliseconds.
	SeenMs int64 `json:"seen_ms"`
}

// Quorum reports whether every group has a leader, so that every queue
// can be written.
func (s Status) Quorum() bool {
	if s.Meta != nil && s.Meta.Leader == "" {
		return false
	}
	for _, g := range s.Streams {
		if g.Leader == "" {
			return false
		}
	}
	return true
}

// Groups lists the meta group, if known, then the streams' groups.
func (s Status) Groups() []Group {
	if s.Meta == nil {
		return s.Streams
	}
	return append([]Group{*s.Meta}, s.Streams...)
}

// Lagging lists the groups with a replica that is not current, as
// "group/replica".
func (s Status) Lagging() []string {
	var out []string
	for _, g := range s.Groups() {
		for _, r := range g.Replicas {
			if !r.Current {
				out = append(out, g.Name+"/"+r.Name)
			}
		}
	}
	return out
}

// Status asks JetStream for the meta group (embedded server only) and
// every stream's group.
func (n *Node) Status(ctx context.Context) (Status, error) {
	var st Status
	if n.srv != nil {
		jsz, err := n.srv.Jsz(&server.JSzOptions{})
		if err != nil {
			return st, fmt.Errorf("jetstream meta group: %w", err)
		}
		meta := Group{Name: "meta"}
		// Only the meta leader follows its replicas: a follower's view of
		// them is not kept up to date, so it lists none.
		if m := jsz.Meta; m != nil {
			meta.Leader = m.Leader
			for _, p := range m.Replicas {
				if m.Leader != n.srv.Name() {
					break
				}
				meta.Replicas = append(meta.Replicas, replica(p.Name, p.Current, p.Offline, p.Lag, p.Active))
			}
		}
		st.Meta = &meta
	}
	l := n.js.ListStreams(ctx)
	for info := range l.Info() {
		g := Group{Name: info.Config.Name, Messages: info.State.Msgs}
		if c := info.Cluster; c != nil {
			g.Leader = c.Leader
			for _, p := range c.Replicas {
				g.Replicas = append(g.Replicas, replica(p.Name, p.Current, p.Offline, p.Lag, p.Active))
			}
		} else {
			// A server alone: it leads its streams.
			g.Leader = n.name()
		}
		st.Streams = append(st.Streams, g)
	}
	if err := l.Err(); err != nil {
		return st, fmt.Errorf("list streams: %w", err)
	}
	slices.SortFunc(st.Streams, func(a, b Group) int { return strings.Compare(a.Name, b.Name) })
	return st, nil
}

func replica(name string, current, offline bool, lag uint64, active time.Duration) Replica {
	return Replica{Name: name, Current: current, Offline: offline, Lag: lag, SeenMs: active.Milliseconds()}
}

// name is the embedded server's name, or the joined server's.
func (n *Node) name() string {
	if n.srv != nil {
		return n.srv.Name()
	}
	return n.nc.ConnectedServerName()
}
