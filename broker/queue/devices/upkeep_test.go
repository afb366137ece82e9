package devices

import (
	"slices"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// TestUpkeepPace checks which duties each tick runs: each at the first
// tick at or after it is due, once however many of its periods passed.
func TestUpkeepPace(t *testing.T) {
	const ms = time.Millisecond
	for _, c := range []struct {
		name  string
		every [3]time.Duration // flush, sweep, evict
		ticks []time.Duration
		want  []string
	}{
		{"flush every tick, the others when due", [3]time.Duration{10 * ms, 30 * ms, 60 * ms},
			[]time.Duration{10 * ms, 20 * ms, 30 * ms, 40 * ms, 50 * ms, 60 * ms},
			[]string{"10ms:flush", "20ms:flush", "30ms:flush", "30ms:sweep", "40ms:flush", "50ms:flush", "60ms:flush", "60ms:sweep", "60ms:evict"}},
		{"a late tick runs what is due once", [3]time.Duration{10 * ms, 30 * ms, 60 * ms},
			[]time.Duration{95 * ms, 100 * ms},
			[]string{"95ms:flush", "95ms:sweep", "95ms:evict", "100ms:flush"}},
		{"a pace that is not a multiple waits for the next tick", [3]time.Duration{10 * ms, 25 * ms, time.Hour},
			[]time.Duration{10 * ms, 20 * ms, 30 * ms, 40 * ms, 50 * ms},
			[]string{"10ms:flush", "20ms:flush", "30ms:flush", "30ms:sweep", "40ms:flush", "50ms:flush", "50ms:sweep"}},
		{"a long flush interval is kept on a shorter tick", [3]time.Duration{time.Hour, 20 * ms, 10 * ms},
			[]time.Duration{10 * ms, 20 * ms},
			[]string{"10ms:evict", "20ms:sweep", "20ms:evict"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			start := time.Unix(0, 0)
			var got []string
			var at time.Duration
			k := &Upkeep[struct{}]{start: start}
			for i, name := range []string{"flush", "sweep", "evict"} {
				k.duties = append(k.duties, Duty{Every: c.every[i], next: c.every[i], Run: func() { got = append(got, at.String()+":"+name) }})
			}
			for _, at = range c.ticks {
				k.Run(start.Add(at))
			}
			if !slices.Equal(got, c.want) {
				t.Fatalf("ran %v\nwant %v", got, c.want)
			}
		})
	}
}

// TestUpkeepOwnDuty checks that a backend's own duty sets the pace when
// it is the shortest, and runs after the registry's.
func TestUpkeepOwnDuty(t *testing.T) {
	r := New[struct{}](nil, Options{Settings: queue.Settings{AckFlushInterval: time.Hour, DeviceTTL: time.Hour}})
	ran := 0
	k := r.Upkeep(Duty{Every: 5 * time.Millisecond, Run: func() { ran++ }})
	defer k.Stop()
	if len(k.duties) != 4 || k.duties[3].next != 5*time.Millisecond {
		t.Fatalf("duties %+v, want the own duty last, first due at 5ms", k.duties)
	}
	select {
	case tick := <-k.C:
		k.Run(tick)
	case <-time.After(10 * time.Second):
		t.Fatal("no tick at the own duty's pace")
	}
	if ran != 1 {
		t.Fatalf("own duty ran %d times on its first tick, want 1", ran)
	}
}
