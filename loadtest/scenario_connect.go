package loadtest

import (
	"context"
	"fmt"
	"time"
)

// ConnectResult is what the connect scenario measured.
type ConnectResult struct {
	// Target is the connections asked for.
	Target int `json:"target"`
	// Connected is the connections that opened and subscribed.
	Connected int `json:"connected"`
	// Failed is the connections that did not.
	Failed int `json:"failed"`
	// SourceIPs is how many loopback source addresses carried them.
	SourceIPs int `json:"source_ips"`
	// RampSec is the time to open them all.
	RampSec float64 `json:"ramp_s"`
	// HoldSec is how long they were held open after the ramp.
	HoldSec float64 `json:"hold_s"`
	// SettledSec is the time from the last connection's CONNACK to the
	// server memory reading of ServerRSSHeldMB and RSSPerConnKB.
	SettledSec float64 `json:"settled_s,omitempty"`
	// ServerRSSBeforeMB is the server's resident memory before the ramp, when measured.
	ServerRSSBeforeMB float64 `json:"server_rss_before_mb,omitempty"`
	// ServerRSSHeldMB is the server's resident memory at the end of the hold, when measured.
	ServerRSSHeldMB float64 `json:"server_rss_held_mb,omitempty"`
	// RSSPerConnKB is the server's memory growth per connection in KiB,
	// read SettledSec after the last connection, when measured.
	RSSPerConnKB float64 `json:"rss_per_conn_kb,omitempty"`
}

// runConnect opens idle persistent connections at the configured rate
// (the ramp is bounded by the duration), holds them for the hold time
// once the last one is up, and measures connect latency and the server's
// memory per connection at the end of the hold: settled, the last
// connection being that long ago.
func (r *run) runConnect(ctx context.Context) error {
	res := &ConnectResult{Target: len(r.users), SourceIPs: max(1, r.sourceIPs)}
	r.connect = res
	var before int64
	if r.watch != nil {
		if _, rss, err := r.watch.sample(); err == nil {
			before = rss
			res.ServerRSSBeforeMB = mib(rss)
		}
	}
	idxs := make([]int, len(r.users))
	for i := range idxs {
		idxs[i] = i
	}
	rampCtx, cancel := context.WithTimeout(ctx, r.cfg.Duration)
	defer cancel()
	start := time.Now()
	clients, _, err := r.connectAll(rampCtx, idxs, r.cfg.ConnectRate)
	res.RampSec = time.Since(start).Seconds()
	defer r.disconnectAll(clients)
	for _, c := range clients {
		if c != nil {
			res.Connected++
		}
	}
	last := lastConnack(clients)
	// Connections the ramp never reached before its deadline count as failed.
	res.Failed = res.Target - res.Connected
	if res.Connected == 0 {
		if err != nil {
			return fmt.Errorf("%w: %w", errNoClients, err)
		}
		return errNoClients
	}

	r.setPhase(phaseHold)
	holdStart := time.Now()
	sleep(ctx, r.cfg.Hold)
	res.HoldSec = time.Since(holdStart).Seconds()
	if r.watch != nil {
		if _, rss, err := r.watch.sample(); err == nil {
			res.SettledSec = time.Since(last).Seconds()
			res.ServerRSSHeldMB = mib(rss)
			if before > 0 {
				res.RSSPerConnKB = float64(rss-before) / 1024 / float64(res.Connected)
			}
		}
	}
	return nil
}

// lastConnack returns when the last of clients (nil ones left out) got
// its first CONNACK.
func lastConnack(clients []*client) time.Time {
	var last int64
	for _, c := range clients {
		if c != nil {
			last = max(last, c.connectedAt.Load())
		}
	}
	return time.Unix(0, last)
}
