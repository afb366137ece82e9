package delivery

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"testing"
	"time"
)

var (
	skipSeeds = flag.Int("skip-seeds", 20, "random event sequences TestSkipModel runs")
	skipSeed  = flag.Uint64("skip-seed", 0, "run TestSkipModel on this one seed (from a failure's log)")
)

// skipMeta marks a message that is not for device, as Options.Skip reads it.
func skipMeta(device string) []byte { return []byte("not-for:" + device) }

func skipFor(device string, meta []byte) bool { return string(meta) == "not-for:"+device }

// TestSkipModel drives two devices of one user through random stores,
// acknowledgements, reconnects and disconnects, with some messages not
// for one of them (Options.Skip), and checks after every step against a
// model: a device is never sent a message skipped for it, the cursor the
// Source has never passes a message the device still owes an
// acknowledgement for, and once everything is acknowledged every device's
// cursor is at the head, skipped messages at the end included, and each
// device got every message meant for it.
func TestSkipModel(t *testing.T) {
	base, n := uint64(time.Now().UnixNano()), *skipSeeds
	if *skipSeed != 0 {
		base, n = *skipSeed, 1
	}
	for i := 0; i < n; i++ {
		seed := base + uint64(i)
		t.Run(strconv.FormatUint(seed, 10), func(t *testing.T) {
			t.Logf("seed %d (go test -run TestSkipModel ./broker/msgpath/delivery/ -args -skip-seed %d)", seed, seed)
			runSkipModel(t, seed)
		})
	}
}

// skipDevice is a device of the model: what it was sent and acknowledged.
type skipDevice struct {
	name   string
	dev    *Device
	sink   *fakeSink
	seen   int               // packets of sink already taken in
	owed   map[uint16]uint64 // packet ID -> seq, sent and not acknowledged
	got    map[uint64]bool   // every seq it was sent
	acked  map[uint64]bool   // every seq it acknowledged
	online bool
}

func runSkipModel(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	src := newSource()
	d := New(Options{
		Source: src, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		TailMessages: 1 + rng.IntN(8), ReadAhead: 1 + rng.IntN(6), Skip: skipFor,
	})
	defer d.Close()
	window := 1 + rng.IntN(4)
	devs := []*skipDevice{{name: "phone"}, {name: "laptop"}}
	notFor := map[uint64]string{}
	start := func(dv *skipDevice) {
		src.mu.Lock()
		cursor := src.acked[dv.name]
		src.mu.Unlock()
		dv.sink, dv.seen, dv.owed = newSink(), 0, map[uint16]uint64{}
		dev, err := d.Start("alice", dv.name, cursor, window, dv.sink)
		if err != nil {
			t.Fatal(err)
		}
		dv.dev, dv.online = dev, true
	}
	// intake takes in what dv's sink got since the last look.
	intake := func(dv *skipDevice) {
		dv.sink.mu.Lock()
		defer dv.sink.mu.Unlock()
		for ; dv.seen < len(dv.sink.seqs); dv.seen++ {
			seq, err := strconv.ParseUint(dv.sink.seqs[dv.seen], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			if notFor[seq] == dv.name {
				t.Fatalf("%s was sent %d, which is not for it", dv.name, seq)
			}
			dv.owed[dv.sink.pids[dv.seen]] = seq
			dv.got[seq] = true
		}
	}
	check := func(step int, what string) {
		for _, dv := range devs {
			if dv.online {
				intake(dv)
			}
			src.mu.Lock()
			cursor := src.acked[dv.name]
			src.mu.Unlock()
			// The lowest message meant for dv that it never acknowledged.
			for seq := uint64(1); seq <= cursor; seq++ {
				if notFor[seq] != dv.name && !dv.acked[seq] {
					t.Fatalf("step %d (%s): cursor of %s at %d passes %d, never acknowledged", step, what, dv.name, cursor, seq)
				}
			}
		}
	}
	for _, dv := range devs {
		dv.got, dv.acked = map[uint64]bool{}, map[uint64]bool{}
		start(dv)
	}
	var seq uint64
	for step := 0; step < 300; step++ {
		dv := devs[rng.IntN(len(devs))]
		var what string
		switch r := rng.IntN(10); {
		case r < 4:
			seq++
			var meta []byte
			if rng.IntN(3) == 0 {
				notFor[seq] = devs[rng.IntN(len(devs))].name
				meta = skipMeta(notFor[seq])
			}
			// The message and its meta in one step: a device reading ahead
			// must not see it without (CI ci11d sent the phone a message
			// stored and only then marked not for it).
			m := src.storeMeta(seq, meta)
			what = fmt.Sprintf("store %d (not for %q)", seq, notFor[seq])
			if rng.IntN(5) > 0 { // sometimes the notification is lost, as between nodes
				d.Stored("alice", m)
			}
		case r < 8 && dv.online:
			intake(dv)
			if len(dv.owed) == 0 {
				continue
			}
			pids := make([]uint16, 0, len(dv.owed))
			for pid := range dv.owed {
				pids = append(pids, pid)
			}
			slices.Sort(pids)
			pid := pids[rng.IntN(len(pids))]
			what = fmt.Sprintf("%s acks %d", dv.name, dv.owed[pid])
			dv.acked[dv.owed[pid]] = true
			delete(dv.owed, pid)
			d.Acked(dv.dev, pid)
		case r == 8 && dv.online:
			what = dv.name + " disconnects"
			intake(dv)
			d.Stop(dv.dev)
			dv.online = false
		default:
			what = dv.name + " connects"
			if dv.online {
				intake(dv)
				d.Stop(dv.dev)
			}
			start(dv)
		}
		t.Logf("step %d: %s", step, what)
		check(step, what)
	}
	// Bring every device online and acknowledge everything it is sent
	// until the cursors reach the head.
	deadline := time.Now().Add(10 * time.Second)
	for _, dv := range devs {
		if !dv.online {
			start(dv)
		}
	}
	for {
		done := true
		for _, dv := range devs {
			intake(dv)
			for pid, s := range dv.owed {
				dv.acked[s] = true
				delete(dv.owed, pid)
				d.Acked(dv.dev, pid)
			}
			src.mu.Lock()
			done = done && src.acked[dv.name] == seq
			src.mu.Unlock()
		}
		check(-1, "drain")
		if done {
			break
		}
		// Notifications lost at the end are found only by reading, which
		// a cluster node does when it knows notices were lost.
		d.Resync()
		if time.Now().After(deadline) {
			src.mu.Lock()
			defer src.mu.Unlock()
			t.Fatalf("cursors %v after draining, want every one at %d", src.acked, seq)
		}
		time.Sleep(time.Millisecond)
	}
	for _, dv := range devs {
		for s := uint64(1); s <= seq; s++ {
			if notFor[s] != dv.name && !dv.got[s] {
				t.Fatalf("%s never got %d", dv.name, s)
			}
		}
	}
}
