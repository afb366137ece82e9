package jsqueue

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
	"github.com/chatd/chatd/broker/queue"
)

// BenchmarkAppend stores 200-byte messages to 200 users, all in flight
// at once as under many publishers, and waits for every Done: R1 on one
// embedded node, and R3 on three nodes of one machine.
func BenchmarkAppend(b *testing.B) {
	for _, bc := range []struct {
		name     string
		replicas int
	}{{"R1", 1}, {"R3", 3}} {
		b.Run(bc.name, func(b *testing.B) {
			var nodes []*natsnode.Node
			if bc.replicas == 1 {
				n, err := natsnode.Start(context.Background(), natsnode.Config{Name: "bench", Dir: b.TempDir(), Listen: "127.0.0.1:0", Logger: quiet()})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(n.Shutdown)
				nodes = []*natsnode.Node{n}
			} else {
				nodes = natstest.Cluster(b, 3)
			}
			s, err := Open(context.Background(), Options{
				Conn: nodes[0].Conn(), Settings: queue.DefaultSettings(), Replicas: bc.replicas, Logger: quiet(),
			})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			const users = 200
			payload := make([]byte, 200)
			var wg sync.WaitGroup
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				wg.Add(1)
				s.Append(&queue.Request{To: fmt.Sprint("u", i%users), Sender: "sender", ID: fmt.Sprint(i), Data: payload,
					Done: func(st queue.Status, _ queue.Message, err error) {
						if st != queue.Stored {
							b.Errorf("append: %v %v", st, err)
						}
						wg.Done()
					}})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
		})
	}
}
