package loadtest

import (
	"context"
	"fmt"
	"time"
)

// RestartResult is what the restart scenario measured.
type RestartResult struct {
	// Messages is how many messages were to be queued.
	Messages int `json:"messages"`
	// Recipients is how many offline users they were queued for.
	Recipients int `json:"recipients"`
	// Queued is how many were PUBACKed before the server was killed.
	Queued int64 `json:"queued"`
	// QueueSec is the time from the first send to the last PUBACK.
	QueueSec float64 `json:"queue_s"`
	// QueueRate is Queued / QueueSec: the durable write rate.
	QueueRate float64 `json:"queue_per_s"`
	// ReadySec is the time from the new process's start until its MQTT
	// port accepted TCP connections.
	ReadySec float64 `json:"ready_s"`
	// ConnackSec is the time from the new process's start until the first
	// recipient, connecting as soon as the port accepted, had its CONNACK.
	ConnackSec float64 `json:"connack_s"`
	// FirstDeliverySec is the time from the new process's start until
	// that recipient received its first queued message.
	FirstDeliverySec float64 `json:"first_delivery_s"`
	// Delivered is the queued messages delivered after the restart (each
	// counted once).
	Delivered int64 `json:"delivered"`
	// DrainSec is the time from the first recipient's CONNECT to the last
	// message delivered.
	DrainSec float64 `json:"drain_s"`
	// DrainRate is Delivered / DrainSec.
	DrainRate float64 `json:"drain_per_s"`
	// Complete says every queued message arrived.
	Complete bool `json:"complete"`
	// ServerLog is where the server's output went, if anywhere.
	ServerLog string `json:"server_log,omitempty"`
}

// restartUsers returns the user indices of the restart scenario's senders
// and recipients (newRun lists the senders first).
func (r *run) restartUsers() (senders, recipients []int) {
	for i := range r.users {
		if i < r.cfg.Senders {
			senders = append(senders, i)
		} else {
			recipients = append(recipients, i)
		}
	}
	return senders, recipients
}

// runRestart queues messages for offline recipients, SIGKILLs the server
// that --server-cmd started, as a crash would, starts it again, and
// measures how long the new process takes to accept connections and to
// deliver the first queued message to a recipient that reconnects at
// once. Then every recipient drains its queue, and the ledger tells
// whether anything PUBACKed before the kill was lost. Queueing and
// draining together are bounded by the duration; the grace period follows.
func (r *run) runRestart(ctx context.Context) error {
	deadline := time.Now().Add(r.cfg.Duration)
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	sidx, ridx := r.restartUsers()
	res := &RestartResult{Messages: r.cfg.Messages, Recipients: len(ridx), ServerLog: r.cfg.ServerLog}
	r.restart = res

	// Each recipient opens its persistent session once: a plain broker
	// keeps messages only for sessions it knows.
	known, _, err := r.connectAll(dctx, ridx, 0)
	r.disconnectAll(known)
	if err != nil {
		return fmt.Errorf("register the recipients: %w", err)
	}
	fill, err := r.fillQueues(dctx, sidx, ridx)
	if err != nil {
		return err
	}
	res.Queued, res.QueueSec, res.QueueRate = fill.queued, fill.sec, fill.rate
	if dctx.Err() != nil {
		return fmt.Errorf("queue %d messages: %d PUBACKed before the run's bound: %w", r.cfg.Messages, res.Queued, dctx.Err())
	}

	r.setPhase(phaseRestart)
	srv := r.servers[0]
	// Read the CPU the process used up to its death, which /proc forgets
	// with it.
	if _, _, err := r.watch.sample(); err != nil {
		r.errs.add(fmt.Errorf("sample server before kill: %w", err))
	}
	srv.kill()
	// A store with many messages may take its time to open: the run's
	// bound applies rather than the usual start-up timeout.
	srv.readyTimeout = max(serverReadyTimeout, time.Until(deadline))
	if err := srv.restart(ctx); err != nil {
		return fmt.Errorf("restart the server after SIGKILL: %w", err)
	}
	r.watch.switchPID(srv.pid())
	started, ready := srv.startTimes()
	res.ReadySec = ready.Sub(started).Seconds()

	r.setPhase(phaseDrain)
	first, connStart, connacked, err := r.reconnectFirst(dctx, ridx[0])
	if err != nil {
		return err
	}
	defer first.disconnect()
	res.ConnackSec = connacked.Sub(started).Seconds()
	for {
		if at, _ := r.ledger.DeliveryWindow(); at > 0 {
			res.FirstDeliverySec = time.Unix(0, at).Sub(started).Seconds()
			break
		}
		if !sleep(dctx, time.Millisecond) {
			r.errs.add(fmt.Errorf("no queued message delivered to %s after the restart", first.user))
			break
		}
	}

	// The senders come back too: any error event queued for them (a
	// refused message) counts as a refusal rather than a loss.
	others, _, err := r.connectAll(dctx, append(append([]int(nil), ridx[1:]...), sidx...), 0)
	defer r.disconnectAll(others)
	if err != nil {
		r.errs.add(fmt.Errorf("reconnect after the restart: %w", err))
	}
	r.awaitDelivery(dctx, time.Until(deadline))
	r.setPhase(phaseGrace)
	if !r.awaitDelivery(ctx, r.cfg.Grace) {
		r.errs.add(fmt.Errorf("restart drain incomplete: %d messages outstanding after the grace period", r.ledger.Outstanding()))
	}
	res.Complete = r.ledger.Outstanding() == 0
	res.Delivered = r.ledger.Snapshot().Unique
	if _, last := r.ledger.DeliveryWindow(); last > 0 {
		res.DrainSec = time.Unix(0, last).Sub(connStart).Seconds()
		if res.DrainSec > 0 {
			res.DrainRate = float64(res.Delivered) / res.DrainSec
		}
	}
	return nil
}

// reconnectFirst connects user index idx as soon as the restarted server
// lets it, trying again while a server that accepts TCP connections is
// not yet answering CONNECT in time, until ctx ends. It returns the
// client, when its first CONNECT went out and when its CONNACK came.
func (r *run) reconnectFirst(ctx context.Context, idx int) (*client, time.Time, time.Time, error) {
	start := time.Now()
	for {
		c, err := r.newClient(idx)
		if err != nil {
			return nil, start, start, err
		}
		attempt := time.Now()
		connack, _, err := c.connect(ctx)
		if err == nil {
			return c, start, attempt.Add(connack), nil
		}
		c.abort()
		if !sleep(ctx, 50*time.Millisecond) {
			return nil, start, start, fmt.Errorf("reconnect recipient %s after the restart: %w", c.user, err)
		}
	}
}
