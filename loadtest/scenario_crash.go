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
	// RestartMs is, per kill, the time from SIGKILL until the new server accepted connections.
	RestartMs []float64 `json:"restart_ms"`
	// ServerLog is where the server's output went, if anywhere.
	ServerLog string `json:"server_log,omitempty"`
}

// runCrash runs the chat scenario while SIGKILLing the server every
// KillEvery and starting it again; the last restart happens before the
// grace period, which must then see every PUBACKed message delivered.
func (r *run) runCrash(ctx context.Context) error {
	res := &CrashResult{ServerLog: r.cfg.ServerLog}
	r.crash = res
	return r.runChat(ctx, func(sendCtx context.Context) {
		for sleep(sendCtx, r.cfg.KillEvery) {
			// Read the CPU the process used up to its death, which /proc
			// forgets with it.
			if _, _, err := r.watch.sample(); err != nil {
				r.errs.add(fmt.Errorf("sample server before kill: %w", err))
			}
			killed := time.Now()
			r.server.kill()
			if err := r.server.restart(ctx); err != nil {
				r.errs.add(fmt.Errorf("restart server after kill: %w", err))
				return
			}
			r.watch.switchPID(r.server.pid())
			res.Kills++
			res.RestartMs = append(res.RestartMs, float64(time.Since(killed).Microseconds())/1000)
		}
	})
}
