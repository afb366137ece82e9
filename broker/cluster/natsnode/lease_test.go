package natsnode_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
	"github.com/chatd/chatd/internal/testutil"
)

// TestLeases: one holder at a time; a clean release hands the lease over
// at once; a holder whose lease was taken notices at its next renewal;
// a holder restarted under its own name takes its lease back without
// waiting for it to expire; a crashed holder's lease expires.
func TestLeases(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	nodes := natstest.Cluster(t, 3)
	js := nodes[0].JetStream()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const ttl = 2 * time.Second
	open := func(holder string) *natsnode.Leases {
		l, err := natsnode.OpenLeases(ctx, js, "leases", 3, holder, ttl, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	a, b := open("a"), open("b")

	heldA, releaseA, err := a.Hold(ctx, "job")
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		held    context.Context
		release func()
		err     error
	}
	gotB := make(chan result, 1)
	go func() {
		h, r, err := b.Hold(ctx, "job")
		gotB <- result{h, r, err}
	}()
	// Several renewals long: b must not get a lease a holds and renews.
	select {
	case r := <-gotB:
		t.Fatalf("b got the lease a holds: %v", r.err)
	case <-time.After(2 * ttl):
	}
	if heldA.Err() != nil {
		t.Fatal("a lost a lease it renews")
	}
	releaseA()
	var rb result
	select {
	case rb = <-gotB:
	case <-time.After(3 * ttl):
		t.Fatal("b did not get the lease a released")
	}
	if rb.err != nil {
		t.Fatal(rb.err)
	}

	// A restarted b (a new Leases under the same name) takes it back at
	// once; the old one's next renewal fails, and its context ends.
	// The old b keeps renewing: only a takeover gets b2 the lease.
	b2 := open("b")
	held2, release2, err := b2.Hold(ctx, "job")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 3*ttl, func() bool { return rb.held.Err() != nil }, "the old holder notices its lease was taken")
	rb.release()

	// Someone else's write ends the holder's lease too.
	kv, err := js.KeyValue(ctx, "leases")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "job", []byte("intruder")); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 3*ttl, func() bool { return held2.Err() != nil }, "the holder notices the lease was overwritten")
	release2()
	if _, v, ok, err := natsnode.KVLast(ctx, js, "leases", "job"); err != nil || !ok || string(v) != "intruder" {
		t.Fatalf("a lost lease was given up over its new holder: %q, %v", v, err)
	}
	// The intruder never renews, like a holder that crashed: its lease
	// expires and another node gets it.
	start := time.Now()
	_, releaseA, err = a.Hold(ctx, "job")
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 3*ttl {
		t.Fatalf("a crashed holder's lease was taken over after %v", took)
	}
	releaseA()
	// Read at the bucket's leader: a replica may not have the delete yet.
	if _, v, ok, err := natsnode.KVLast(ctx, js, "leases", "job"); err != nil || ok {
		t.Fatalf("a released lease: %q, %v", v, err)
	}
}
