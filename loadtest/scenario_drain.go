package loadtest

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// DrainResult is what the drain scenario measured.
type DrainResult struct {
	// Messages is how many messages were to be queued.
	Messages int `json:"messages"`
	// Queued is how many were PUBACKed while the recipient was offline.
	Queued int64 `json:"queued"`
	// QueueSec is the time from the first send to the last PUBACK.
	QueueSec float64 `json:"queue_s"`
	// QueueRate is Queued / QueueSec: the durable write rate.
	QueueRate float64 `json:"queue_per_s"`
	// FirstMs is the time from the recipient's CONNECT to its first message.
	FirstMs float64 `json:"first_ms"`
	// DrainSec is the time from the recipient's CONNECT to its last message.
	DrainSec float64 `json:"drain_s"`
	// DrainRate is the messages received per second of DrainSec.
	DrainRate float64 `json:"drain_per_s"`
	// Complete says every queued message arrived.
	Complete bool `json:"complete"`
}

// runDrain queues messages for an offline user, then connects it and
// measures how fast its queue drains. Queueing and draining together are
// bounded by the duration; the grace period follows.
func (r *run) runDrain(ctx context.Context) error {
	deadline := time.Now().Add(r.cfg.Duration)
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	recv := len(r.users) - 1
	res := &DrainResult{Messages: r.cfg.Messages}
	r.drain = res

	// A user the broker has never seen may have nowhere to queue (a
	// plain broker keeps messages only for known persistent sessions).
	known, _, err := r.connectAll(dctx, []int{recv}, 0)
	r.disconnectAll(known)
	if err != nil {
		return fmt.Errorf("register the offline user: %w", err)
	}

	sidx := make([]int, r.cfg.Senders)
	for i := range sidx {
		sidx[i] = i
	}
	fill, err := r.fillQueues(dctx, sidx, []int{recv})
	if err != nil {
		return err
	}
	res.Queued, res.QueueSec, res.QueueRate = fill.queued, fill.sec, fill.rate

	r.setPhase(phaseDrain)
	rc, err := r.newClient(recv)
	if err != nil {
		return err
	}
	drainStart := time.Now()
	if _, _, err := rc.connect(dctx); err != nil {
		rc.abort()
		return fmt.Errorf("connect the drained user: %w", err)
	}
	defer rc.disconnect()
	r.awaitDelivery(dctx, time.Until(deadline))
	r.setPhase(phaseGrace)
	if !r.awaitDelivery(ctx, r.cfg.Grace) {
		r.errs.add(fmt.Errorf("drain incomplete: %d messages outstanding after the grace period", r.ledger.Outstanding()))
	}
	res.Complete = r.ledger.Outstanding() == 0
	first, last := r.ledger.DeliveryWindow()
	if first > 0 {
		res.FirstMs = float64(first-drainStart.UnixNano()) / 1e6
		res.DrainSec = float64(last-drainStart.UnixNano()) / 1e9
		if res.DrainSec > 0 {
			res.DrainRate = float64(r.ledger.Snapshot().Unique) / res.DrainSec
		}
	}
	return nil
}

// queueFill is what fillQueues measured.
type queueFill struct {
	// queued is the messages PUBACKed.
	queued int64
	// sec is the time from the first send to the last PUBACK or failure.
	sec float64
	// rate is queued per second of sec.
	rate float64
}

// fillQueues connects the senders, has them queue the configured number
// of messages for the recipients, round robin, waits for every PUBACK,
// and disconnects them: nothing but the server's store holds the
// messages afterwards. Its error is only about connecting the senders;
// ctx ending cuts the filling short.
func (r *run) fillQueues(ctx context.Context, sidx, ridx []int) (queueFill, error) {
	senders, _, err := r.connectAll(ctx, sidx, 0)
	defer r.disconnectAll(senders)
	if err != nil {
		return queueFill{}, fmt.Errorf("connect senders: %w", err)
	}
	r.setPhase(phaseQueue)
	var budget atomic.Int64
	budget.Store(int64(r.cfg.Messages))
	interval := sendInterval(r.cfg.Rate, len(senders))
	start := time.Now()
	var wg sync.WaitGroup
	for _, c := range senders {
		wg.Go(func() { r.queueRoundRobin(ctx, c, ridx, &budget, interval) })
	}
	wg.Wait()
	for {
		c := r.ledger.Snapshot()
		if c.Acked+c.SendFailed >= c.Sent || !sleep(ctx, 5*time.Millisecond) {
			break
		}
	}
	fill := queueFill{queued: r.ledger.Snapshot().Acked, sec: time.Since(start).Seconds()}
	if fill.sec > 0 {
		fill.rate = float64(fill.queued) / fill.sec
	}
	return fill, nil
}

// queueRoundRobin sends from c while the shared budget lasts, message b
// of the budget (counting down) going to recipient b mod len(to): the
// recipients' shares differ by at most one. Each pair is numbered from 1.
func (r *run) queueRoundRobin(ctx context.Context, c *client, to []int, budget *atomic.Int64, interval time.Duration) {
	p := pacer{interval: interval, next: time.Now()}
	n := make([]uint64, len(to))
	for {
		b := budget.Add(-1)
		if b < 0 || !p.wait(ctx) {
			return
		}
		k := int(b % int64(len(to)))
		n[k]++
		if !r.send(ctx, c, to[k], n[k], 0) {
			return
		}
	}
}
