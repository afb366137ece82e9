package loadtest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

// Kinds of connection cut the fault proxy applies.
const (
	// cutDown disables the proxy: every connection is closed and new ones are refused.
	cutDown = "down"
	// cutReset resets every connection as soon as it carries data (TCP RST).
	cutReset = "reset"
	// cutStall stops all data, then closes the connections: a half-open link that dies.
	cutStall = "stall"
)

// FaultProxy is an in-process toxiproxy between the clients and the broker
// that adds latency, jitter and a bandwidth limit, and cuts connections.
// Its bandwidth toxic logs through zerolog's global logger at trace level:
// programs raise zerolog's global level to keep that off their output.
type FaultProxy struct {
	mu    sync.Mutex
	proxy *toxiproxy.Proxy
	// The shaping Shape installed, lifted during cuts.
	latency, jitter time.Duration
	kbps            int
}

// NewFaultProxy starts a proxy on a free loopback port forwarding to upstream (host:port).
func NewFaultProxy(upstream string) (*FaultProxy, error) {
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, "loadtest", "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		return nil, fmt.Errorf("start fault proxy to %s: %w", upstream, err)
	}
	return &FaultProxy{proxy: p}, nil
}

// Addr returns the host:port clients should dial instead of the broker.
func (f *FaultProxy) Addr() string {
	f.proxy.Lock()
	defer f.proxy.Unlock()
	return f.proxy.Listen
}

// toxic is the JSON form toxiproxy takes toxics in.
type toxic struct {
	Name       string         `json:"name"`
	Type       string         `json:"type"`
	Stream     string         `json:"stream"`
	Toxicity   float32        `json:"toxicity"`
	Attributes map[string]any `json:"attributes"`
}

// add installs a toxic of typ with attrs in both directions, under names
// prefix_upstream and prefix_downstream.
func (f *FaultProxy) add(prefix, typ string, attrs map[string]any) error {
	for _, stream := range []string{"upstream", "downstream"} {
		b, err := json.Marshal(toxic{Name: prefix + "_" + stream, Type: typ, Stream: stream, Toxicity: 1, Attributes: attrs})
		if err != nil {
			return fmt.Errorf("encode %s toxic: %w", typ, err)
		}
		if _, err := f.proxy.Toxics.AddToxicJson(strings.NewReader(string(b))); err != nil {
			return fmt.Errorf("add %s toxic %s: %w", typ, stream, err)
		}
	}
	return nil
}

// remove removes the toxics add installed under prefix.
func (f *FaultProxy) remove(prefix string) error {
	for _, stream := range []string{"upstream", "downstream"} {
		if err := f.proxy.Toxics.RemoveToxic(context.Background(), prefix+"_"+stream); err != nil {
			return fmt.Errorf("remove toxic %s_%s: %w", prefix, stream, err)
		}
	}
	return nil
}

// Shape adds latency with jitter and, when kbps > 0, a bandwidth limit in
// KB/s, in both directions, for every connection old and new.
func (f *FaultProxy) Shape(latency, jitter time.Duration, kbps int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.latency, f.jitter, f.kbps = latency, jitter, kbps
	return f.shape()
}

func (f *FaultProxy) shaped() bool { return f.latency > 0 || f.jitter > 0 || f.kbps > 0 }

func (f *FaultProxy) shape() error {
	if f.latency > 0 || f.jitter > 0 {
		if err := f.add("latency", "latency", map[string]any{"latency": f.latency.Milliseconds(), "jitter": f.jitter.Milliseconds()}); err != nil {
			return err
		}
	}
	if f.kbps > 0 {
		if err := f.add("bandwidth", "bandwidth", map[string]any{"rate": f.kbps}); err != nil {
			return err
		}
	}
	return nil
}

// Cut applies one cut of the given kind that lasts d, then heals the
// network. It always heals, even when ctx ends early.
//
// The shaping toxics are lifted for the length of the cut: in toxiproxy
// v2.5.0 a latency or bandwidth toxic whose connection dies while it holds
// data blocks forever on its output, leaking goroutines on every cut.
func (f *FaultProxy) Cut(ctx context.Context, kind string, d time.Duration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if kind != cutDown && kind != cutReset && kind != cutStall {
		return fmt.Errorf("unknown cut %q", kind)
	}
	if f.shaped() {
		f.proxy.Toxics.ResetToxics(context.Background())
	}
	if err := f.cut(ctx, kind, d); err != nil {
		return err
	}
	if f.shaped() {
		return f.shape()
	}
	return nil
}

func (f *FaultProxy) cut(ctx context.Context, kind string, d time.Duration) error {
	switch kind {
	case cutDown:
		f.proxy.Stop()
		sleep(ctx, d)
		if err := f.proxy.Start(); err != nil {
			return fmt.Errorf("re-enable fault proxy: %w", err)
		}
		return nil
	case cutReset:
		if err := f.add("cut", "reset_peer", map[string]any{"timeout": 0}); err != nil {
			return err
		}
	default:
		if err := f.add("cut", "timeout", map[string]any{"timeout": d.Milliseconds()}); err != nil {
			return err
		}
	}
	sleep(ctx, d)
	return f.remove("cut")
}

// Heal removes every toxic and the shaping, leaving a clean pass-through.
func (f *FaultProxy) Heal() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.latency, f.jitter, f.kbps = 0, 0, 0
	f.proxy.Toxics.ResetToxics(context.Background())
}

// Close stops the proxy and closes every connection through it.
func (f *FaultProxy) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.proxy.Stop()
}
