package loadtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/url"
)

// FaultResult is what the flaky scenario did to the network.
type FaultResult struct {
	// Proxy is the fault proxy's address.
	Proxy string `json:"proxy"`
	// LatencyMs is the latency added per direction.
	LatencyMs int64 `json:"latency_ms"`
	// JitterMs is the latency jitter.
	JitterMs int64 `json:"jitter_ms"`
	// BandwidthKBs is the bandwidth limit per connection and direction, 0 for none.
	BandwidthKBs int `json:"bandwidth_kb_s"`
	// Cuts counts the cuts applied by kind.
	Cuts map[string]int `json:"cuts"`
}

// runFlaky runs the chat scenario through a fault proxy that shapes the
// traffic and cuts the connections every CutEvery; the faults stop with
// the sending phase so that the grace period can show nothing was lost.
func (r *run) runFlaky(ctx context.Context) error {
	// Config.Validate allows the flaky scenario one broker URL only.
	u, err := url.Parse(r.brokers[0])
	if err != nil {
		return fmt.Errorf("broker %q: %w", r.brokers[0], err)
	}
	fp, err := NewFaultProxy(u.Host)
	if err != nil {
		return err
	}
	defer fp.Close()
	if err := fp.Shape(r.cfg.Latency, r.cfg.Jitter, r.cfg.Bandwidth); err != nil {
		return err
	}
	u.Host = fp.Addr()
	r.setBrokers([]string{u.String()})
	res := &FaultResult{
		Proxy:        fp.Addr(),
		LatencyMs:    r.cfg.Latency.Milliseconds(),
		JitterMs:     r.cfg.Jitter.Milliseconds(),
		BandwidthKBs: r.cfg.Bandwidth,
		Cuts:         make(map[string]int),
	}
	r.faults = res
	rng := rand.New(rand.NewPCG(r.seed(), 0))
	err = r.runChat(ctx, func(ctx context.Context) {
		defer fp.Heal()
		if r.cfg.CutEvery <= 0 {
			<-ctx.Done()
			return
		}
		for sleep(ctx, r.cfg.CutEvery) {
			kind := r.cfg.Cuts[rng.IntN(len(r.cfg.Cuts))]
			if err := fp.Cut(ctx, kind, r.cfg.CutFor); err != nil {
				r.errs.add(err)
				continue
			}
			res.Cuts[kind]++
		}
	})
	return err
}
