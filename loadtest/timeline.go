package loadtest

import (
	"context"
	"time"
)

// Point is one sampling interval (about a second) of a run.
type Point struct {
	// T is the end of the interval in seconds since the run started.
	T float64 `json:"t_s"`
	// Phase is what the run was doing.
	Phase string `json:"phase"`
	// SentPerSec is the publish rate.
	SentPerSec float64 `json:"sent_per_s"`
	// AckedPerSec is the PUBACK rate.
	AckedPerSec float64 `json:"acked_per_s"`
	// DeliveredPerSec is the rate of first deliveries.
	DeliveredPerSec float64 `json:"delivered_per_s"`
	// Duplicates is the duplicate deliveries in the interval.
	Duplicates int64 `json:"duplicates"`
	// P99Ms is the send->deliver p99 of the interval's first deliveries;
	// merged from agents, the p99 of their same intervals' histograms merged.
	P99Ms float64 `json:"p99_ms"`
	// Errors is the errors in the interval.
	Errors int64 `json:"errors"`
	// Connected is the live client connections at the end of the interval.
	Connected int64 `json:"connected"`
	// ServerCPU is the server's CPU use in percent of one core, when measured.
	ServerCPU float64 `json:"server_cpu_pct"`
	// ServerRSSMB is the server's resident memory in MiB, when measured.
	ServerRSSMB float64 `json:"server_rss_mb"`
	// ClientCPU is the load tester's own CPU use in percent of one core.
	ClientCPU float64 `json:"client_cpu_pct"`
}

func (r *run) sampleEverySecond(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case now := <-t.C:
			r.takeSample(now)
		case <-ctx.Done():
			return
		}
	}
}

// takeSample appends one Point covering the time since the previous one
// and updates the progress line.
func (r *run) takeSample(now time.Time) {
	r.seriesMu.Lock()
	defer r.seriesMu.Unlock()
	dt := now.Sub(r.prevAt).Seconds()
	if dt <= 0.05 {
		return
	}
	c, interval := r.ledger.Snapshot(), r.ledger.TakeInterval()
	if r.book != nil {
		c, interval = r.book.Snapshot(), r.book.TakeInterval()
	}
	errs, _ := r.errs.snapshot()
	errs += c.SendFailed + c.ErrorEvents + c.Malformed + c.Misrouted + c.CopiesMisrouted
	p := Point{
		T:               now.Sub(r.start).Seconds(),
		Phase:           r.phase.Load().(string),
		SentPerSec:      float64(c.Sent-r.prev.Sent) / dt,
		AckedPerSec:     float64(c.Acked-r.prev.Acked) / dt,
		DeliveredPerSec: float64(c.Unique-r.prev.Unique) / dt,
		Duplicates:      c.Duplicates - r.prev.Duplicates,
		P99Ms:           PercentilesOf(interval).P99,
		Errors:          errs - r.prevErrs,
		Connected:       r.conns.connected.Load(),
	}
	if r.watch != nil {
		if cpu, rss, err := r.watch.sample(); err == nil {
			p.ServerCPU, p.ServerRSSMB = cpu, mib(rss)
		}
	}
	if cpu, _, err := r.self.sample(); err == nil {
		p.ClientCPU = cpu
	}
	r.series = append(r.series, p)
	if r.cfg.Raw {
		e, err := encodeHistogram(interval)
		if err != nil {
			r.errs.add(err)
		}
		r.seriesHists = append(r.seriesHists, e)
	}
	r.prev, r.prevErrs, r.prevAt = c, errs, now
	if r.progress != nil {
		deliver, _, _ := r.ledger.Histograms()
		if r.book != nil {
			deliver = r.book.deliverHistogram()
		}
		r.progress.Update(Status{
			Scenario:  r.cfg.Scenario,
			Phase:     p.Phase,
			Elapsed:   now.Sub(r.start),
			Sent:      c.Sent,
			Delivered: c.Unique,
			Rate:      p.DeliveredPerSec,
			P99Ms:     PercentilesOf(deliver).P99,
			Errors:    errs,
			Connected: p.Connected,
			Run:       r.tag,
			Point:     p,
			Counts:    c,
		})
	}
}
