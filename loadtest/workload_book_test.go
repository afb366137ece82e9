package loadtest

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/chatd/chatd/loadtest/workload"
)

// TestBookModel drives the workload's book with random sends, PUBACKs,
// refusals, deliveries (repeated and out of order) and read receipts,
// and checks after every step that its figures are those of a simple
// model: what is owed is what was PUBACKed and not refused, times its
// recipients; lost is what is owed and never delivered.
func TestBookModel(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	users := []string{"a", "b", "c", "d"}
	for round := range 50 {
		b := newBook("tag", users)
		type msg struct {
			from           int
			n              uint64
			to             []int
			acked, refused bool
			got            map[int]int
			action         string
		}
		var msgs []*msg
		next := make([]uint64, len(users))
		type read struct {
			reader, sender int
			ids            []string
			acked, arrived bool
		}
		var reads []*read
		lastN := map[[2]int]uint64{}
		var order int64
		for step := range 200 {
			switch k := rng.IntN(7); {
			case k == 0 || len(msgs) == 0:
				from := rng.IntN(len(users))
				next[from]++
				m := &msg{from: from, n: next[from], got: map[int]int{}, action: workload.DM}
				for _, to := range rng.Perm(len(users)) {
					if to != from && (len(m.to) == 0 || rng.IntN(2) == 0) {
						m.to = append(m.to, to)
					}
				}
				if len(m.to) > 1 {
					m.action = workload.Group
				}
				b.sending(m.action, from, m.n, m.to, make([]bool, len(m.to)), 1)
				msgs = append(msgs, m)
			case k == 1:
				m := msgs[rng.IntN(len(msgs))]
				b.acked(m.from, m.n, 2)
				m.acked = true
			case k == 2 && rng.IntN(4) == 0:
				m := msgs[rng.IntN(len(msgs))]
				b.refused(m.from, b.msgID(m.n), "queue_full")
				m.refused = true
			case k == 3 || k == 4:
				m := msgs[rng.IntN(len(msgs))]
				to := m.to[rng.IntN(len(m.to))]
				first := b.delivered(to, users[m.from], b.msgID(m.n), 3)
				if first != (m.got[to] == 0) {
					t.Fatalf("round %d step %d: delivered says first=%v after %d deliveries", round, step, first, m.got[to])
				}
				if m.got[to] == 0 {
					pair := [2]int{m.from, to}
					if m.n < lastN[pair] {
						order++
					} else {
						lastN[pair] = m.n
					}
				}
				m.got[to]++
			case k == 5:
				rd := &read{reader: rng.IntN(len(users)), sender: rng.IntN(len(users)), ids: []string{b.msgID(uint64(step + 1))}}
				b.readSending(rd.reader, rd.sender, rd.ids, true, 1)
				// The receipt may reach its sender before its PUBACK reaches the reader.
				if rng.IntN(2) == 0 {
					b.readArrived(rd.sender, users[rd.reader], rd.ids, 2)
					rd.arrived = true
				}
				b.readAcked(rd.reader, rd.sender, rd.ids, true, 2)
				rd.acked = true
				reads = append(reads, rd)
			case k == 6 && len(reads) > 0:
				rd := reads[rng.IntN(len(reads))]
				if !rd.arrived {
					b.readArrived(rd.sender, users[rd.reader], rd.ids, 3)
					rd.arrived = true
				}
			}

			actions, _, _, counts, _ := b.result()
			var owed, lost, delivered int64
			for _, m := range msgs {
				if !m.acked || m.refused {
					continue
				}
				for _, to := range m.to {
					owed++
					if m.got[to] == 0 {
						lost++
					}
				}
			}
			for _, m := range msgs {
				for _, to := range m.to {
					if m.got[to] > 0 {
						delivered++
					}
				}
			}
			var readsLost int64
			for _, rd := range reads {
				if rd.acked && !rd.arrived {
					readsLost++
				}
			}
			gotOwed := actions[workload.DM].Expected + actions[workload.Group].Expected
			gotDelivered := actions[workload.DM].Delivered + actions[workload.Group].Delivered
			if out := b.outstandingTo(func(int) bool { return true }); out != lost+readsLost {
				t.Fatalf("round %d step %d: outstanding %d, model %d", round, step, out, lost+readsLost)
			}
			if gotOwed != owed {
				t.Fatalf("round %d step %d: owed %d, model %d", round, step, gotOwed, owed)
			}
			if counts.Lost != lost+readsLost || actions[workload.Read].Lost != readsLost || gotDelivered != delivered || counts.OrderViolations != order {
				t.Fatalf("round %d step %d: lost %d (reads %d), delivered %d, order %d; model: lost %d (reads %d), delivered %d, order %d",
					round, step, counts.Lost, actions[workload.Read].Lost, gotDelivered, counts.OrderViolations, lost+readsLost, readsLost, delivered, order)
			}
		}
	}
}
