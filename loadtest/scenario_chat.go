package loadtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"
)

// runChat connects every device of every user, lets each user send to
// random other users from its devices for the configured duration, then
// waits out the grace period for the messages and sent copies still on
// their way. during, when not nil, runs beside the sending phase (fault
// injection, server kills) and must return once its context ends, leaving
// the network and server healthy.
func (r *run) runChat(ctx context.Context, during func(context.Context)) error {
	idxs := make([]int, len(r.users))
	for i := range idxs {
		idxs[i] = i
	}
	// Connecting is bounded too, so that an unreachable or overloaded
	// broker still ends the run. Every device is connected, and so known
	// to the broker, before anything is sent: each must receive all.
	connectCtx, cancelConnect := context.WithTimeout(ctx, r.cfg.Duration+r.cfg.ConnectTimeout)
	clients, _, err := r.connectDevices(connectCtx, idxs, r.devices, 0)
	cancelConnect()
	if err != nil {
		r.disconnectAll(clients)
		return fmt.Errorf("connect %d users, %d devices each: %w", len(idxs), r.devices, err)
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
	interval := sendInterval(r.cfg.Rate, len(r.users))
	seed := r.seed()
	var wg sync.WaitGroup
	for i := range r.users {
		devs := clients[i*r.devices : (i+1)*r.devices]
		wg.Go(func() { r.sendLoop(sendCtx, devs, rand.New(rand.NewPCG(seed, uint64(i))), interval) })
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

// seed returns the run's seed: the configured one, or the one drawn for
// the run, which its report shows.
func (r *run) seed() uint64 { return r.seedV }

// sendLoop sends from the devices of one user to random other users
// until ctx ends, each message from one of its devices drawn at random
// when it has several. Each sending device numbers its messages to each
// user from 1 and, with several devices, all its messages from 1 (the copy
// number its other devices check the order of its sent copies by).
func (r *run) sendLoop(ctx context.Context, devs []*client, rng *rand.Rand, interval time.Duration) {
	from := devs[0].idx
	n := make(map[int]uint64) // by device*len(r.users) + recipient
	copies := make([]uint64, len(devs))
	p := pacer{interval: interval, next: time.Now()}
	if interval > 0 {
		// Spread the senders over the interval instead of sending in bursts.
		p.next = p.next.Add(time.Duration(rng.Int64N(int64(interval))))
	}
	for p.wait(ctx) {
		to := rng.IntN(len(r.users) - 1)
		if to >= from {
			to++
		}
		// With one device the draws are those of a run without devices.
		k, cn := 0, uint64(0)
		if len(devs) > 1 {
			k = rng.IntN(len(devs))
			copies[k]++
			cn = copies[k]
		}
		pair := k*len(r.users) + to
		n[pair]++
		if !r.send(ctx, devs[k], to, n[pair], cn) {
			return
		}
	}
}

// send sends message n, copy number cn, from c to user index to. A
// failure is counted and pauses the sender briefly, so that a broken
// connection is not spun on. It returns false once ctx has ended.
func (r *run) send(ctx context.Context, c *client, to int, n, cn uint64) bool {
	err := c.send(ctx, to, n, cn)
	if err == nil {
		return true
	}
	if ctx.Err() != nil {
		return false
	}
	r.errs.add(err)
	return sleep(ctx, 10*time.Millisecond)
}
