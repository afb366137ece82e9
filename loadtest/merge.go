package loadtest

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// EncodedHistogram is an HDR histogram of microsecond latencies in
// HdrHistogram's V2 compressed encoding (base64), the interchange format
// of its log files: a few dozen bytes when empty, a few kilobytes when
// full, where the histogram's JSON Snapshot takes some 47 KB whatever it
// holds.
type EncodedHistogram string

// encodeHistogram encodes h.
func encodeHistogram(h *hdrhistogram.Histogram) (EncodedHistogram, error) {
	b, err := h.Encode(hdrhistogram.V2CompressedEncodingCookieBase)
	if err != nil {
		return "", fmt.Errorf("encode histogram: %w", err)
	}
	return EncodedHistogram(b), nil
}

// Histogram decodes e. It must have the geometry the load tester records
// with (1 µs to one hour, three significant digits), so that merging it
// with another is exact.
func (e EncodedHistogram) Histogram() (*hdrhistogram.Histogram, error) {
	if e == "" {
		return nil, errors.New("decode histogram: empty")
	}
	h, err := hdrhistogram.Decode([]byte(e))
	if err != nil {
		return nil, fmt.Errorf("decode histogram: %w", err)
	}
	if h.LowestTrackableValue() != histLowest || h.HighestTrackableValue() != histHighest || h.SignificantFigures() != histDigits {
		return nil, fmt.Errorf("decode histogram: range %d-%d, %d digits; want %d-%d, %d digits",
			h.LowestTrackableValue(), h.HighestTrackableValue(), h.SignificantFigures(), histLowest, histHighest, histDigits)
	}
	return h, nil
}

// RawData is what a report is computed from that its summary cannot be
// merged from: percentiles of several runs are not a function of their
// percentiles, nor throughput of their throughputs.
type RawData struct {
	// Agent names the agent whose report this is; the coordinator sets it.
	Agent string `json:"agent,omitempty"`
	// Deliver is the send->deliver histogram of first deliveries.
	Deliver EncodedHistogram `json:"deliver"`
	// Ack is the send->PUBACK histogram.
	Ack EncodedHistogram `json:"ack"`
	// Receipt is the send->delivered-receipt histogram.
	Receipt EncodedHistogram `json:"receipt"`
	// Copy is the send->sent-copy histogram.
	Copy EncodedHistogram `json:"copy"`
	// Connack is the CONNECT->CONNACK histogram of first connections.
	Connack EncodedHistogram `json:"connack"`
	// Suback is the CONNECT->SUBACK histogram of first connections.
	Suback EncodedHistogram `json:"suback"`
	// FirstSend is when the first message was sent, Unix nanoseconds, 0 for none.
	FirstSend int64 `json:"first_send_ns"`
	// LastDelivery is when the last first delivery came, Unix nanoseconds, 0 for none.
	LastDelivery int64 `json:"last_delivery_ns"`
	// Series holds the send->deliver histogram of each point of the
	// report's Series, in the same order.
	Series []EncodedHistogram `json:"series"`
}

// rawData gathers the run's raw data; deliver, ack and receipt are the
// ledger's histograms the report was computed from.
func (r *run) rawData(deliver, ack, receipt *hdrhistogram.Histogram) (*RawData, error) {
	raw := &RawData{FirstSend: r.ledger.FirstSend(), LastDelivery: r.lastDelivery()}
	r.latMu.Lock()
	connack, suback := r.connectH.Clone(), r.subscribeH.Clone()
	r.latMu.Unlock()
	var errs []error
	for _, x := range []struct {
		dst *EncodedHistogram
		h   *hdrhistogram.Histogram
	}{
		{&raw.Deliver, deliver}, {&raw.Ack, ack}, {&raw.Receipt, receipt},
		{&raw.Copy, r.ledger.CopyHistogram()}, {&raw.Connack, connack}, {&raw.Suback, suback},
	} {
		e, err := encodeHistogram(x.h)
		errs = append(errs, err)
		*x.dst = e
	}
	r.seriesMu.Lock()
	raw.Series = append([]EncodedHistogram(nil), r.seriesHists...)
	r.seriesMu.Unlock()
	if err := errors.Join(errs...); err != nil {
		return raw, fmt.Errorf("raw data: %w", err)
	}
	return raw, nil
}

// AgentSummary is one agent's share of a run with several agents.
type AgentSummary struct {
	// Agent is the agent's address.
	Agent string `json:"agent"`
	// RunTag prefixes the message ids of the agent's share.
	RunTag string `json:"run_tag"`
	// Users is the users the agent drove.
	Users int `json:"users"`
	// Rate is the agent's target send rate, 0 for as fast as flow control allows.
	Rate float64 `json:"rate"`
	// Sent is the messages the agent's users sent.
	Sent int64 `json:"sent"`
	// Unique is their first deliveries.
	Unique int64 `json:"unique"`
	// Lost is their messages lost.
	Lost int64 `json:"lost"`
	// Deliver is the send->deliver latency of the agent's share.
	Deliver Percentiles `json:"deliver_latency"`
	// ErrorCount is the errors the agent met.
	ErrorCount int64 `json:"error_count"`
	// Host is the agent's machine.
	Host Host `json:"host"`
	// Client is the agent's own resource use.
	Client ProcUsage `json:"client"`
}

// mergedHists are the histograms of one report, decoded.
type mergedHists struct {
	deliver, ack, receipt, copied, connack, suback *hdrhistogram.Histogram
	series                                         []*hdrhistogram.Histogram
}

func decodeRaw(raw *RawData) (*mergedHists, error) {
	m := new(mergedHists)
	for _, x := range []struct {
		name string
		dst  **hdrhistogram.Histogram
		e    EncodedHistogram
	}{
		{"deliver", &m.deliver, raw.Deliver}, {"ack", &m.ack, raw.Ack}, {"receipt", &m.receipt, raw.Receipt},
		{"copy", &m.copied, raw.Copy}, {"connack", &m.connack, raw.Connack}, {"suback", &m.suback, raw.Suback},
	} {
		h, err := x.e.Histogram()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", x.name, err)
		}
		*x.dst = h
	}
	for i, e := range raw.Series {
		h, err := e.Histogram()
		if err != nil {
			return nil, fmt.Errorf("series point %d: %w", i+1, err)
		}
		m.series = append(m.series, h)
	}
	return m, nil
}

// merge adds o's histograms to m's, the series aligned by index.
func (m *mergedHists) merge(o *mergedHists) {
	m.deliver.Merge(o.deliver)
	m.ack.Merge(o.ack)
	m.receipt.Merge(o.receipt)
	m.copied.Merge(o.copied)
	m.connack.Merge(o.connack)
	m.suback.Merge(o.suback)
	for i, h := range o.series {
		if i < len(m.series) {
			m.series[i].Merge(h)
		} else {
			m.series = append(m.series, h.Clone())
		}
	}
}

// agentName names report i of a merge: its Raw.Agent, or its position.
func agentName(rep *Report, i int) string {
	if rep.Raw != nil && rep.Raw.Agent != "" {
		return rep.Raw.Agent
	}
	return fmt.Sprintf("agent %d", i+1)
}

// MergeReports merges the reports of runs made side by side, each with
// Config.Raw and its own users (the agents of one run), into the report
// of the whole: counts, refusal codes, MQTT 5 reason codes, the clients
// of each protocol version and connections summed (the Receive Maximum
// granted: the least and the most of any agent); latency
// percentiles and bins recomputed from the merged HDR histograms, so
// exact; throughput from the total of first deliveries over the span from
// the earliest first send to the latest last delivery (the agents' clocks
// are taken to agree, as NTP keeps them, to well under that span; each
// latency is measured on one machine); the per-second series aligned by
// index, rates and counts summed and each second's p99 recomputed from
// the agents' histograms of that second; errors and lost samples taken
// from each report in turn, errors prefixed with their agent's name.
// Only the chat scenario's reports merge: the others' results (drain,
// connect, faults, crash, restart) have no meaning summed.
func MergeReports(reps []*Report) (*Report, error) {
	if len(reps) == 0 {
		return nil, errors.New("merge reports: no report")
	}
	names := make([]string, len(reps))
	var hists *mergedHists
	for i, rep := range reps {
		if rep == nil {
			return nil, fmt.Errorf("merge reports: report %d is missing", i+1)
		}
		names[i] = agentName(rep, i)
		switch {
		case rep.Raw == nil:
			return nil, fmt.Errorf("merge reports: %s: no raw data (the run needs Config.Raw)", names[i])
		case rep.Scenario != reps[0].Scenario || rep.Plain != reps[0].Plain:
			return nil, fmt.Errorf("merge reports: %s ran %s (plain %v), %s ran %s (plain %v)",
				names[0], reps[0].Scenario, reps[0].Plain, names[i], rep.Scenario, rep.Plain)
		case rep.Drain != nil || rep.Connect != nil || rep.Faults != nil || rep.Crash != nil || rep.Restart != nil:
			return nil, fmt.Errorf("merge reports: %s: the %s scenario's results cannot be merged", names[i], rep.Scenario)
		case len(rep.Raw.Series) != len(rep.Series):
			return nil, fmt.Errorf("merge reports: %s: %d series points, %d histograms", names[i], len(rep.Series), len(rep.Raw.Series))
		}
		h, err := decodeRaw(rep.Raw)
		if err != nil {
			return nil, fmt.Errorf("merge reports: %s: %w", names[i], err)
		}
		if hists == nil {
			hists = h
		} else {
			hists.merge(h)
		}
	}

	first := reps[0]
	out := &Report{
		Scenario:    first.Scenario,
		Broker:      joinDistinct(reps, func(r *Report) string { return r.Broker }),
		Plain:       first.Plain,
		RunTag:      joinDistinct(reps, func(r *Report) string { return r.RunTag }),
		Settings:    first.Settings,
		Host:        hostInfo(),
		Deliver:     PercentilesOf(hists.deliver),
		Ack:         PercentilesOf(hists.ack),
		Receipt:     PercentilesOf(hists.receipt),
		Copy:        PercentilesOf(hists.copied),
		LatencyBins: LogBins(hists.deliver),
		Connections: Connections{
			Clients: int(hists.connack.TotalCount()),
			Connack: PercentilesOf(hists.connack),
			Suback:  PercentilesOf(hists.suback),
		},
	}
	out.Settings.Users, out.Settings.Rate, out.Settings.Agents = 0, 0, names

	var (
		start, end              time.Time
		firstSend, lastDelivery int64
		errs, lossReasons, lost [][]string
	)
	codes := map[string]int64{}
	for i, rep := range reps {
		out.Settings.Users += rep.Settings.Users
		out.Settings.Rate += rep.Settings.Rate
		out.Counts = addCounts(out.Counts, rep.Counts)
		for k, v := range rep.RefusalCodes {
			codes[k] += v
		}
		out.ReasonCodes = addReasons(out.ReasonCodes, rep.ReasonCodes)
		out.Protocols = addProtocols(out.Protocols, rep.Protocols)
		out.SendRate += rep.SendRate
		out.Interrupted = out.Interrupted || rep.Interrupted
		if e := rep.Started.Add(time.Duration(rep.ElapsedSec * float64(time.Second))); end.IsZero() || e.After(end) {
			end = e
		}
		if start.IsZero() || rep.Started.Before(start) {
			start = rep.Started
		}
		if s := rep.Raw.FirstSend; s > 0 && (firstSend == 0 || s < firstSend) {
			firstSend = s
		}
		lastDelivery = max(lastDelivery, rep.Raw.LastDelivery)

		out.Connections.Reconnects += rep.Connections.Reconnects
		out.Connections.SessionsLost += rep.Connections.SessionsLost
		out.Connections.Lost += rep.Connections.Lost
		out.Connections.Nodes = addNodes(out.Connections.Nodes, rep.Connections.Nodes)
		lossReasons = append(lossReasons, prefixed(names[i], rep.Connections.LossReasons))
		out.Client = addUsage(out.Client, rep.Client)
		out.Flood = addFlood(out.Flood, rep.Flood)
		out.ErrorCount += rep.ErrorCount
		errs = append(errs, prefixed(names[i], rep.Errors))
		lost = append(lost, rep.LostSamples)
		out.Agents = append(out.Agents, AgentSummary{
			Agent: names[i], RunTag: rep.RunTag, Users: rep.Settings.Users, Rate: rep.Settings.Rate,
			Sent: rep.Counts.Sent, Unique: rep.Counts.Unique, Lost: rep.Counts.Lost,
			Deliver: rep.Deliver, ErrorCount: rep.ErrorCount, Host: rep.Host, Client: rep.Client,
		})
	}
	out.Started = start
	out.ElapsedSec = end.Sub(start).Seconds()
	if len(codes) > 0 {
		out.RefusalCodes = codes
	}
	if firstSend > 0 && lastDelivery > firstSend {
		out.Throughput = float64(out.Counts.Unique) / (float64(lastDelivery-firstSend) / 1e9)
	}
	out.Connections.LossReasons = takeTurns(lossReasons, maxErrorSamples)
	out.Errors = takeTurns(errs, maxErrorSamples)
	out.LostSamples = takeTurns(lost, maxLostSamples)
	out.Series = mergeSeries(reps, hists.series)
	return out, nil
}

// addCounts returns a+b, field by field.
func addCounts(a, b Counts) Counts {
	return Counts{
		Sent:                a.Sent + b.Sent,
		SendFailed:          a.SendFailed + b.SendFailed,
		Acked:               a.Acked + b.Acked,
		Delivered:           a.Delivered + b.Delivered,
		Unique:              a.Unique + b.Unique,
		Duplicates:          a.Duplicates + b.Duplicates,
		Lost:                a.Lost + b.Lost,
		InFlight:            a.InFlight + b.InFlight,
		Refused:             a.Refused + b.Refused,
		OrderViolations:     a.OrderViolations + b.OrderViolations,
		Misrouted:           a.Misrouted + b.Misrouted,
		Foreign:             a.Foreign + b.Foreign,
		Receipts:            a.Receipts + b.Receipts,
		ErrorEvents:         a.ErrorEvents + b.ErrorEvents,
		Malformed:           a.Malformed + b.Malformed,
		Other:               a.Other + b.Other,
		CopiesExpected:      a.CopiesExpected + b.CopiesExpected,
		CopiesReceived:      a.CopiesReceived + b.CopiesReceived,
		CopiesLost:          a.CopiesLost + b.CopiesLost,
		CopyDuplicates:      a.CopyDuplicates + b.CopyDuplicates,
		CopyOrderViolations: a.CopyOrderViolations + b.CopyOrderViolations,
		CopiesMisrouted:     a.CopiesMisrouted + b.CopiesMisrouted,
	}
}

// addNodes adds the per-node counts b to a, matching nodes by URL.
func addNodes(a, b []NodeConnections) []NodeConnections {
	for _, n := range b {
		i := slices.IndexFunc(a, func(m NodeConnections) bool { return m.URL == n.URL })
		if i < 0 {
			a = append(a, NodeConnections{URL: n.URL})
			i = len(a) - 1
		}
		a[i].Clients += n.Clients
		a[i].Connects += n.Connects
		a[i].AtClose += n.AtClose
	}
	return a
}

// addUsage sums two processes' resource use: what the load testers of
// every agent took together.
func addUsage(a, b ProcUsage) ProcUsage {
	return ProcUsage{
		CPUSeconds:    a.CPUSeconds + b.CPUSeconds,
		AvgCPUPercent: a.AvgCPUPercent + b.AvgCPUPercent,
		StartRSSMB:    a.StartRSSMB + b.StartRSSMB,
		PeakRSSMB:     a.PeakRSSMB + b.PeakRSSMB,
		EndRSSMB:      a.EndRSSMB + b.EndRSSMB,
	}
}

// addFlood sums what the flooders of two shares did; nil stands for none.
func addFlood(a, b *FloodResult) *FloodResult {
	if b == nil {
		return a
	}
	if a == nil {
		c := *b
		return &c
	}
	return &FloodResult{Clients: a.Clients + b.Clients, Sent: a.Sent + b.Sent, Acked: a.Acked + b.Acked, Rate: a.Rate + b.Rate}
}

// mergeSeries merges the reports' per-second series point by point: the
// agents start within a moment of each other, so their Nth seconds are
// the same second. hists holds the merged send->deliver histogram of each
// index.
func mergeSeries(reps []*Report, hists []*hdrhistogram.Histogram) []Point {
	n := 0
	for _, rep := range reps {
		n = max(n, len(rep.Series))
	}
	out := make([]Point, n)
	for i := range out {
		p := &out[i]
		var phases []string
		for _, rep := range reps {
			if i >= len(rep.Series) {
				continue // that agent's run had ended
			}
			q := rep.Series[i]
			p.T = max(p.T, q.T)
			if !slices.Contains(phases, q.Phase) {
				phases = append(phases, q.Phase)
			}
			p.SentPerSec += q.SentPerSec
			p.AckedPerSec += q.AckedPerSec
			p.DeliveredPerSec += q.DeliveredPerSec
			p.Duplicates += q.Duplicates
			p.Errors += q.Errors
			p.Connected += q.Connected
			p.ServerCPU += q.ServerCPU
			p.ServerRSSMB += q.ServerRSSMB
			p.ClientCPU += q.ClientCPU
		}
		// Agents a moment apart may be in different phases at one second.
		p.Phase = strings.Join(phases, "/")
		if i < len(hists) {
			p.P99Ms = PercentilesOf(hists[i]).P99
		}
	}
	return out
}

// joinDistinct joins the distinct values f takes on the reports, in order, with commas.
func joinDistinct(reps []*Report, f func(*Report) string) string {
	var vs []string
	for _, r := range reps {
		if v := f(r); !slices.Contains(vs, v) {
			vs = append(vs, v)
		}
	}
	return strings.Join(vs, ",")
}

// prefixed returns msgs, each prefixed with the agent's name.
func prefixed(agent string, msgs []string) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = agent + ": " + m
	}
	return out
}

// takeTurns takes one message of each list in turn, up to limit in all,
// so that every agent's first messages show however many another had.
func takeTurns(lists [][]string, limit int) []string {
	var out []string
	for k := 0; len(out) < limit; k++ {
		took := false
		for _, l := range lists {
			if k < len(l) && len(out) < limit {
				out = append(out, l[k])
				took = true
			}
		}
		if !took {
			break
		}
	}
	return out
}
