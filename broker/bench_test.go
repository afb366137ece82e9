package broker

import (
	"bytes"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/config"
)

// BenchmarkDirect1to1 measures the whole hot path: paho publishers, PUBACK
// after the durable commit, delivery to paho subscribers, their PUBACKs and
// the deletion of acknowledged messages. Reported per delivered message.
func BenchmarkDirect1to1(b *testing.B) {
	for _, c := range []struct {
		mode     string
		receipts bool
	}{{config.SyncBatch, true}, {config.SyncBatch, false}, {config.SyncAlways, true}} {
		b.Run(fmt.Sprintf("sync=%s/receipts=%v", c.mode, c.receipts), func(b *testing.B) {
			benchDirect(b, c.mode, c.receipts, 50, 32)
		})
	}
}

// isMsg tells a message from a receipt without parsing the envelope.
func isMsg(payload []byte) bool { return bytes.HasPrefix(payload, []byte(`{"kind":"msg"`)) }

func benchDirect(b *testing.B, mode string, receipts bool, users, window int) {
	s := startServer(b, b.TempDir(), func(c *config.Config) {
		c.Queue.Sync = mode
		c.Receipts.Delivered = receipts
	})
	var delivered atomic.Int64
	done := make(chan struct{})
	target := int64(b.N)
	clients := make([]paho.Client, users)
	for i := range users {
		user := fmt.Sprintf("u%d", i)
		opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
			SetClientID(user).SetUsername(user).SetPassword(mint(b, user)).
			SetCleanSession(false).SetOrderMatters(false).SetAutoReconnect(false).
			SetCustomOpenConnectionFn(dialBuffered)
		c := paho.NewClient(opts)
		if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			b.Fatalf("connect: %v", tk.Error())
		}
		tk := c.Subscribe("inbox/"+user, 1, func(_ paho.Client, m paho.Message) {
			if isMsg(m.Payload()) && delivered.Add(1) == target {
				close(done)
			}
		})
		if !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			b.Fatalf("subscribe: %v", tk.Error())
		}
		clients[i] = c
		defer c.Disconnect(50)
	}
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N / users
	for i := range users {
		n := per
		if i == 0 {
			n += b.N - per*users
		}
		wg.Add(1)
		go func(i, n int) {
			defer wg.Done()
			to := fmt.Sprintf("inbox/u%d", (i+1)%users)
			sem := make(chan struct{}, window)
			for k := range n {
				sem <- struct{}{}
				p := fmt.Appendf(nil, `{"id":"%d-%d","text":"hello there, this is a benchmark message"}`, i, k)
				tk := clients[i].Publish(to, 1, false, p)
				go func() { tk.Wait(); <-sem }()
			}
		}(i, n)
	}
	wg.Wait()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		for i := range users {
			u := fmt.Sprintf("u%d", i)
			h, _ := s.queue.Head(u)
			d, _ := s.queue.Depth(u)
			n, next, ok := s.path.Window(u, "")
			b.Logf("%s head %d depth %d inflight %d next %d online %v", u, h, d, n, next, ok)
		}
		b.Logf("mochi received %d publishes, %d packets", s.mqtt.Info.MessagesReceived, s.mqtt.Info.PacketsReceived)
		b.Fatalf("delivered %d of %d", delivered.Load(), b.N)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
}

// BenchmarkDrain measures how fast a reconnecting device drains its offline
// queue from disk. Reported per delivered message.
func BenchmarkDrain(b *testing.B) {
	s := startServer(b, b.TempDir(), nil)
	bob := mustDial(b, s, "bob", phoneOpt{})
	bob.client.Disconnect(100)
	alice := mustDial(b, s, "alice", phoneOpt{noSub: true})
	sem := make(chan struct{}, 256)
	for i := range b.N {
		sem <- struct{}{}
		tk := alice.client.Publish("inbox/bob", 1, false, fmt.Sprintf(`{"id":"m-%d","text":"queued while offline"}`, i))
		go func() { tk.Wait(); <-sem }()
	}
	for range cap(sem) {
		sem <- struct{}{}
	}
	var got atomic.Int64
	done := make(chan struct{})
	b.ResetTimer()
	opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID("bob").SetUsername("bob").SetPassword(mint(b, "bob")).SetCleanSession(false).
		SetCustomOpenConnectionFn(dialBuffered)
	c := paho.NewClient(opts)
	if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		b.Fatal(tk.Error())
	}
	defer c.Disconnect(50)
	c.Subscribe("inbox/bob", 1, func(paho.Client, paho.Message) {
		if got.Add(1) == int64(b.N) {
			close(done)
		}
	})
	select {
	case <-done:
	case <-time.After(120 * time.Second):
		b.Fatalf("drained %d of %d", got.Load(), b.N)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
}

// BenchmarkGroupFanout1024 measures a group of 1,024 online members: one
// member publishes, every other member receives. Reported per delivered copy.
func BenchmarkGroupFanout1024(b *testing.B) {
	const members = 1024
	s := startServer(b, b.TempDir(), nil)
	var names []string
	for i := range members {
		names = append(names, fmt.Sprintf("m%04d", i))
	}
	req, err := http.NewRequest("POST", "http://"+s.HTTPAddr()+"/v1/groups",
		strings.NewReader(fmt.Sprintf(`{"id":"big","members":["%s"]}`, strings.Join(names[1:], `","`))))
	if err != nil {
		b.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+mint(b, names[0]))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusCreated {
		b.Fatalf("create group: %v %v", resp, err)
	}
	resp.Body.Close()
	var delivered atomic.Int64
	done := make(chan struct{})
	target := int64(b.N) * (members - 1)
	clients := make([]paho.Client, members)
	for i, name := range names {
		opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
			SetClientID(name).SetUsername(name).SetPassword(mint(b, name)).
			SetCleanSession(false).SetAutoReconnect(false).SetCustomOpenConnectionFn(dialBuffered)
		c := paho.NewClient(opts)
		if tk := c.Connect(); !tk.WaitTimeout(30*time.Second) || tk.Error() != nil {
			b.Fatalf("connect %s: %v", name, tk.Error())
		}
		tk := c.Subscribe("inbox/"+name, 1, func(_ paho.Client, m paho.Message) {
			if isMsg(m.Payload()) && delivered.Add(1) == target {
				close(done)
			}
		})
		if !tk.WaitTimeout(30*time.Second) || tk.Error() != nil {
			b.Fatalf("subscribe %s: %v", name, tk.Error())
		}
		clients[i] = c
		defer c.Disconnect(50)
	}
	b.ResetTimer()
	sem := make(chan struct{}, 8)
	for i := range b.N {
		sem <- struct{}{}
		tk := clients[0].Publish("group/big", 1, false, fmt.Sprintf(`{"id":"g-%d","text":"hello everyone"}`, i))
		go func() { tk.Wait(); <-sem }()
	}
	select {
	case <-done:
	case <-time.After(300 * time.Second):
		b.Fatalf("delivered %d of %d", delivered.Load(), target)
	}
	b.StopTimer()
	b.ReportMetric(float64(target)/b.Elapsed().Seconds(), "delivered/s")
}
