package loadtest

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// floodWindow is each flooder's unacknowledged publishes: far more than
// any phone keeps, so that the flood is bounded by the broker alone.
const floodWindow = 1024

// FloodResult is what the abusive clients of --flooders did.
type FloodResult struct {
	// Clients is the number of flooders.
	Clients int `json:"clients"`
	// Sent is their publishes.
	Sent int64 `json:"sent"`
	// Acked is their publishes the broker answered with a PUBACK,
	// refusals included.
	Acked int64 `json:"acked"`
	// Rate is acknowledged flood publishes per second of the sending phase.
	Rate float64 `json:"rate_per_s"`
}

// flooders are abusive clients that publish as fast as the broker lets
// them, beside the measured users, to one sink user who never connects.
// They are not in the ledger: the run measures what they do to the
// well-behaved users.
type flooders struct {
	r            *run
	sent, acked  atomic.Int64
	clients      []mqtt.Client
	sinkTopic    string
	payloadBytes int
}

// startFlooders connects n flooders.
func (r *run) startFlooders(ctx context.Context, n int) (*flooders, error) {
	f := &flooders{r: r, sinkTopic: fmt.Sprintf(r.cfg.Topic, r.cfg.UserPrefix+"-sink"), payloadBytes: r.cfg.Size}
	for i := range n {
		user := fmt.Sprintf("%s-flood%d", r.cfg.UserPrefix, i)
		o := mqtt.NewClientOptions()
		// Flooders are spread over the nodes like the users.
		for _, b := range rotatedBrokers(r.brokers, i) {
			o.AddBroker(b)
		}
		o.SetClientID(user).
			SetProtocolVersion(4).
			SetCleanSession(true).
			SetAutoReconnect(false).
			SetConnectTimeout(r.cfg.ConnectTimeout).
			SetKeepAlive(r.cfg.Keepalive).
			SetDialer(&net.Dialer{Timeout: r.cfg.ConnectTimeout})
		if err := r.signIn(o, user); err != nil {
			return f, err
		}
		c := mqtt.NewClient(o)
		tk := c.Connect()
		if !tk.WaitTimeout(r.cfg.ConnectTimeout) {
			return f, fmt.Errorf("connect flooder %s: timeout", user)
		}
		if err := tk.Error(); err != nil {
			return f, fmt.Errorf("connect flooder %s: %w", user, err)
		}
		f.clients = append(f.clients, c)
	}
	return f, nil
}

// run floods from every flooder until ctx ends.
func (f *flooders) run(ctx context.Context) {
	var wg sync.WaitGroup
	for i, c := range f.clients {
		wg.Go(func() { f.flood(ctx, i, c) })
	}
	wg.Wait()
}

// flood publishes valid messages from c back to back, keeping
// floodWindow of them unacknowledged, until ctx ends or c is cut off.
func (f *flooders) flood(ctx context.Context, i int, c mqtt.Client) {
	slots := make(chan struct{}, floodWindow)
	tag := fmt.Sprintf("%s-f%d", f.r.tag, i)
	var buf []byte
	for seq := uint64(1); ctx.Err() == nil && c.IsConnectionOpen(); seq++ {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		buf = appendMessage(buf[:0], message{Tag: tag, Seq: seq, SentAt: time.Now().UnixNano(), Sender: "flood"}, f.payloadBytes)
		tk := c.Publish(f.sinkTopic, 1, false, append([]byte(nil), buf...))
		f.sent.Add(1)
		go func() {
			if tk.WaitTimeout(f.r.cfg.Duration+f.r.cfg.Grace) && tk.Error() == nil {
				f.acked.Add(1)
			}
			<-slots
		}()
	}
}

// close disconnects the flooders and returns what they did.
func (f *flooders) close() *FloodResult {
	for _, c := range f.clients {
		c.Disconnect(100)
	}
	res := &FloodResult{Clients: len(f.clients), Sent: f.sent.Load(), Acked: f.acked.Load()}
	res.Rate = float64(res.Acked) / f.r.cfg.Duration.Seconds()
	return res
}
