package loadtest

import (
	"context"
	"fmt"
	"time"
)

// CrashResult is what the crash scenario did to the server.
type CrashResult struct {
	// Kills is the number of SIGKILLs.
	Kills int `json:"kills"`
	// Nodes is, per kill, the node killed (1 for the first --server-cmd),
	// when the run started several.
	Nodes []int `json:"nodes,omitempty"`
	// RestartMs is, per kill, the time from SIGKILL until the new server accepted connections.
	RestartMs []float64 `json:"restart_ms"`
	// Clients is, per kill, how many clients were connected to the killed server.
	Clients []int `json:"clients"`
	// ResumeMs is, per kill, the time from SIGKILL until every one of those
	// clients was connected again, to any node; -1 when one never was.
	ResumeMs []float64 `json:"resume_ms"`
	// ServerLog is where the server's output went, if anywhere; with
	// several servers, node N's went to ServerLog.N.
	ServerLog string `json:"server_log,omitempty"`
}

// crashKill is one kill, kept until the run ends to measure when the
// clients it disconnected were back.
type crashKill struct {
	at      int64 // SIGKILL, Unix nanoseconds
	clients []*client
}

// runCrash runs the chat scenario while SIGKILLing a server every
// KillEvery and starting it again: the only one, or with several (a
// cluster) one node at a time, round robin, while the clients of the
// killed node reconnect to the others. The last restart happens before
// the grace period, which must then see every PUBACKed message delivered.
func (r *run) runCrash(ctx context.Context) error {
	res := &CrashResult{ServerLog: r.cfg.ServerLog}
	r.crash = res
	var kills []crashKill
	err := r.runChat(ctx, func(sendCtx context.Context) {
		for n := 0; sleep(sendCtx, r.cfg.KillEvery); n++ {
			i := n % len(r.servers)
			srv := r.servers[i]
			if i == 0 {
				// Read the CPU the process used up to its death, which
				// /proc forgets with it.
				if _, _, err := r.watch.sample(); err != nil {
					r.errs.add(fmt.Errorf("sample server before kill: %w", err))
				}
			}
			on := r.clientsOn(srv.nodes)
			killed := time.Now()
			srv.kill()
			kills = append(kills, crashKill{at: killed.UnixNano(), clients: on})
			if err := srv.restart(ctx); err != nil {
				r.errs.add(fmt.Errorf("restart server %d after kill: %w", i+1, err))
				return
			}
			if i == 0 {
				r.watch.switchPID(srv.pid())
			}
			res.Kills++
			if len(r.servers) > 1 {
				res.Nodes = append(res.Nodes, i+1)
			}
			res.RestartMs = append(res.RestartMs, float64(time.Since(killed).Microseconds())/1000)
		}
	})
	// runChat has waited for every client to be connected again: their
	// connection histories are complete.
	for _, k := range kills[:res.Kills] {
		res.Clients = append(res.Clients, len(k.clients))
		res.ResumeMs = append(res.ResumeMs, resumeMs(k))
	}
	return err
}

// clientsOn returns the chat clients whose latest connection is to one of
// nodes. A client that lost that connection and is reconnecting counts
// too: the kill delays its return as well.
func (r *run) clientsOn(nodes []int) []*client {
	on := make(map[int]bool, len(nodes))
	for _, n := range nodes {
		on[n] = true
	}
	var out []*client
	for _, c := range r.chatters {
		if n, ok := c.node(); ok && on[n] {
			out = append(out, c)
		}
	}
	return out
}

// resumeMs returns the time from kill k until the last of its clients
// connected again, as paho's on-connect events recorded it; 0 when the
// killed server had no clients, -1 when one of them never came back.
func resumeMs(k crashKill) float64 {
	last := k.at
	for _, c := range k.clients {
		at, ok := c.connectedAfter(k.at)
		if !ok {
			return -1
		}
		last = max(last, at)
	}
	return float64((last-k.at)/1000) / 1000
}
