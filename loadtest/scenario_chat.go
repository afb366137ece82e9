package loadtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"
)

// runChat connects every user, lets each send to random other users for
// the configured duration, then waits out the grace period for the
// messages still on their way. during, when not nil, runs beside the
// sending phase (fault injection, server kills) and must return once its
// context ends, leaving the network and server healthy.
func (r *run) runChat(ctx context.Context, during func(context.Context)) error {
	idxs := make([]int, len(r.users))
	for i := range idxs {
		idxs[i] = i
	}
	// Connecting is bounded too, so that an unreachable or overloaded
	// broker still ends the run.
	connectCtx, cancelConnect := context.WithTimeout(ctx, r.cfg.Duration+r.cfg.ConnectTimeout)
	clients, _, err := r.connectAll(connectCtx, idxs, 0)
	cancelConnect()
	if err != nil {
		r.disconnectAll(clients)
		return fmt.Errorf("connect %d users: %w", len(idxs), err)
	}

	var flood *flooders
	if r.cfg.Flooders > 0 {
		if flood, err = r.startFlooders(ctx, r.cfg.Flooders); err != nil {
			flood.close()
			r.disconnectAll(clients)
			return err
		}
	}

	r.chatters = clients
	r.setPhase(phaseSend)
	sendCtx, cancel := context.WithTimeout(ctx, r.cfg.Duration)
	defer cancel()
	interval := sendInterval(r.cfg.Rate, len(clients))
	seed := r.seed()
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() { r.sendLoop(sendCtx, c, rand.New(rand.NewPCG(seed, uint64(i))), interval) })
	}
	if flood != nil {
		wg.Go(func() { flood.run(sendCtx) })
	}
	if during != nil {
		wg.Go(func() { during(sendCtx) })
	}
	wg.Wait()
	if flood != nil {
		r.flood = flood.close()
	}

	r.setPhase(phaseGrace)
	// After faults, clients may still be reconnecting; they must be back
	// before the grace period can judge what was lost.
	if !r.awaitConnected(ctx, clients, r.cfg.Grace+r.cfg.ConnectTimeout) {
		r.errs.add(fmt.Errorf("not every client reconnected within %s", r.cfg.Grace+r.cfg.ConnectTimeout))
	}
	r.awaitDelivery(ctx, r.cfg.Grace)
	r.disconnectAll(clients)
	return nil
}

// seed returns the configured seed, or a random one.
func (r *run) seed() uint64 {
	if r.cfg.Seed != 0 {
		return uint64(r.cfg.Seed)
	}
	return rand.Uint64()
}

// sendLoop sends from c to random other users, each pair numbered from 1,
// until ctx ends.
func (r *run) sendLoop(ctx context.Context, c *client, rng *rand.Rand, interval time.Duration) {
	n := make(map[int]uint64)
	p := pacer{interval: interval, next: time.Now()}
	if interval > 0 {
		// Spread the senders over the interval instead of sending in bursts.
		p.next = p.next.Add(time.Duration(rng.Int64N(int64(interval))))
	}
	for p.wait(ctx) {
		to := rng.IntN(len(r.users) - 1)
		if to >= c.idx {
			to++
		}
		n[to]++
		if !r.send(ctx, c, to, n[to]) {
			return
		}
	}
}

// send sends message n from c to user index to. A failure is counted and
// pauses the sender briefly, so that a broken connection is not spun on.
// It returns false once ctx has ended.
func (r *run) send(ctx context.Context, c *client, to int, n uint64) bool {
	err := c.send(ctx, to, n)
	if err == nil {
		return true
	}
	if ctx.Err() != nil {
		return false
	}
	r.errs.add(err)
	return sleep(ctx, 10*time.Millisecond)
}
