package loadtest

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// roundTrip encodes h as an agent sends it and decodes it as the
// coordinator reads it.
func roundTrip(t *testing.T, h *hdrhistogram.Histogram) *hdrhistogram.Histogram {
	t.Helper()
	e, err := encodeHistogram(h)
	if err != nil {
		t.Fatal(err)
	}
	d, err := e.Histogram()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestHistogramMergeExact splits one sample set over two recorders, sends
// both through the wire encoding and merges them: the merge is the
// histogram of the whole set, so every percentile is exact, where an
// average of the two p99s would not be.
func TestHistogramMergeExact(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	whole, a, b := newHist(), newHist(), newHist()
	for i := range 200_000 {
		// Mostly around a millisecond, a tail to seconds, one at the top.
		us := int64(200 + rng.ExpFloat64()*1500)
		switch {
		case i%1000 == 0:
			us = int64(rng.IntN(5_000_000))
		case i == 7:
			us = histHighest
		}
		// Unevenly, and agent a gets the slow ones.
		to := b
		if rng.IntN(3) == 0 || us > 10_000 {
			to = a
		}
		recordMicros(to, us*1000)
		recordMicros(whole, us*1000)
	}
	merged := newHist()
	merged.Merge(roundTrip(t, a))
	merged.Merge(roundTrip(t, b))
	if !merged.Equals(whole) {
		t.Fatal("merged histogram differs from the histogram of the whole set")
	}
	qs := []float64{0, 1, 10, 50, 90, 99, 99.9, 99.99, 100}
	for _, q := range qs {
		if g, w := merged.ValueAtPercentile(q), whole.ValueAtPercentile(q); g != w {
			t.Errorf("p%g: merged %d, whole %d", q, g, w)
		}
	}
	if g, w := PercentilesOf(merged), PercentilesOf(whole); g != w {
		t.Errorf("percentiles: merged %+v, whole %+v", g, w)
	}
	if g, w := LogBins(merged), LogBins(whole); !reflect.DeepEqual(g, w) {
		t.Errorf("bins: merged %v, whole %v", g, w)
	}
	// Neither the mean nor the larger of the two p99s is the p99: what
	// merging the histograms spares us.
	pa, pb, pw := PercentilesOf(a).P99, PercentilesOf(b).P99, PercentilesOf(whole).P99
	if (pa+pb)/2 == pw || max(pa, pb) == pw {
		t.Errorf("p99s %v and %v, of the whole %v: the sample set does not show the point", pa, pb, pw)
	}
}

// TestHistogramFromRecorders records the same set into one recorder
// and into two, each as the ledger does (recordMicros from nanoseconds).
func TestHistogramFromRecorders(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	samples := make([]int64, 50_000)
	for i := range samples {
		samples[i] = int64(rng.NormFloat64()*3e6 + 10e6) // ns, some negative: clamped to 0
	}
	one, a, b := newHist(), newHist(), newHist()
	for i, s := range samples {
		recordMicros(one, s)
		if i < len(samples)/3 {
			recordMicros(a, s)
		} else {
			recordMicros(b, s)
		}
	}
	merged := newHist()
	merged.Merge(roundTrip(t, a))
	merged.Merge(roundTrip(t, b))
	if g, w := PercentilesOf(merged), PercentilesOf(one); g != w {
		t.Errorf("percentiles: two recorders merged %+v, one recorder %+v", g, w)
	}
}

func TestEncodedHistogramGeometry(t *testing.T) {
	other := hdrhistogram.New(1, 1000, 2)
	if err := other.RecordValue(5); err != nil {
		t.Fatal(err)
	}
	b, err := other.Encode(hdrhistogram.V2CompressedEncodingCookieBase)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []EncodedHistogram{EncodedHistogram(b), "", "bm90IGEgaGlzdG9ncmFt"} {
		if _, err := e.Histogram(); err == nil {
			t.Errorf("%q decoded without error", e)
		}
	}
	// An empty histogram takes a few dozen bytes, not the Snapshot's 47 KB.
	e, err := encodeHistogram(newHist())
	if err != nil {
		t.Fatal(err)
	}
	if len(e) > 200 {
		t.Errorf("empty histogram encoded in %d bytes", len(e))
	}
}

// rawOf returns raw data holding the given microsecond samples in every
// histogram and one series histogram per entry of series.
func rawOf(t *testing.T, agent string, samples []int64, series [][]int64, firstSend, lastDelivery int64) *RawData {
	t.Helper()
	h := newHist()
	for _, v := range samples {
		recordMicros(h, v*1000)
	}
	e, err := encodeHistogram(h)
	if err != nil {
		t.Fatal(err)
	}
	raw := &RawData{Agent: agent, Deliver: e, Ack: e, Receipt: e, Copy: e, Connack: e, Suback: e,
		FirstSend: firstSend, LastDelivery: lastDelivery}
	for _, vs := range series {
		sh := newHist()
		for _, v := range vs {
			recordMicros(sh, v*1000)
		}
		se, err := encodeHistogram(sh)
		if err != nil {
			t.Fatal(err)
		}
		raw.Series = append(raw.Series, se)
	}
	return raw
}

// fillCounts sets every field of Counts to base plus its index, so that
// a field MergeReports forgot shows.
func fillCounts(base int64) Counts {
	var c Counts
	v := reflect.ValueOf(&c).Elem()
	for i := range v.NumField() {
		v.Field(i).SetInt(base + int64(i))
	}
	return c
}

// sumCountsReflect adds Counts field by field, whatever fields it has.
func sumCountsReflect(cs ...Counts) Counts {
	var out Counts
	o := reflect.ValueOf(&out).Elem()
	for _, c := range cs {
		v := reflect.ValueOf(c)
		for i := range v.NumField() {
			o.Field(i).SetInt(o.Field(i).Int() + v.Field(i).Int())
		}
	}
	return out
}

func TestMergeReportsSums(t *testing.T) {
	t0 := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	mk := func(agent string, base int64, users int, rate float64, started time.Time, elapsed float64) *Report {
		var errs, lost []string
		for i := range 15 {
			errs = append(errs, fmt.Sprintf("e%d", i))
			lost = append(lost, fmt.Sprintf("%s-l%d", agent, i))
		}
		return &Report{
			Scenario: ScenarioChat, Broker: "tcp://b:1883", RunTag: "tag" + agent, Started: started, ElapsedSec: elapsed,
			Settings: Settings{Users: users, Rate: rate, Size: 256, DurationSec: 10},
			Counts:   fillCounts(base), RefusalCodes: map[string]int64{"rate": base, agent: 1},
			ReasonCodes: []ReasonCount{{Packet: packetPuback, Code: 0x97, Name: "quota exceeded", Count: base}},
			Protocols:   ProtocolStats{MQTT5: int64(users), GrantedMin: users, GrantedMax: users},
			SendRate:    rate, ErrorCount: base, Errors: errs, LostSamples: lost,
			Connections: Connections{Reconnects: base, Lost: base + 1, LossReasons: []string{"eof"}},
			Client:      ProcUsage{PID: 42, CPUSeconds: 2, AvgCPUPercent: 20, PeakRSSMB: 50},
			Flood:       &FloodResult{Clients: 1, Sent: base, Acked: base, Rate: 1},
			Raw: rawOf(t, agent, []int64{1000, 2000}, nil,
				t0.Add(time.Second).UnixNano(), t0.Add(time.Duration(base)*time.Second).UnixNano()),
		}
	}
	a := mk("a", 100, 6, 300, t0, 12)
	b := mk("b", 1000, 4, 200, t0.Add(500*time.Millisecond), 12)
	b.Raw.FirstSend = t0.Add(2 * time.Second).UnixNano()
	m, err := MergeReports([]*Report{a, b})
	if err != nil {
		t.Fatal(err)
	}
	if want := sumCountsReflect(a.Counts, b.Counts); m.Counts != want {
		t.Errorf("counts %+v, want %+v", m.Counts, want)
	}
	if want := map[string]int64{"rate": 1100, "a": 1, "b": 1}; !reflect.DeepEqual(m.RefusalCodes, want) {
		t.Errorf("refusal codes %v, want %v", m.RefusalCodes, want)
	}
	if want := []ReasonCount{{Packet: packetPuback, Code: 0x97, Name: "quota exceeded", Count: 1100}}; !reflect.DeepEqual(m.ReasonCodes, want) {
		t.Errorf("reason codes %+v, want %+v", m.ReasonCodes, want)
	}
	if want := (ProtocolStats{MQTT5: 10, GrantedMin: 4, GrantedMax: 6}); m.Protocols != want {
		t.Errorf("protocols %+v, want %+v", m.Protocols, want)
	}
	if m.Settings.Users != 10 || m.Settings.Rate != 500 || m.SendRate != 500 || !slices.Equal(m.Settings.Agents, []string{"a", "b"}) {
		t.Errorf("settings %+v, send rate %v", m.Settings, m.SendRate)
	}
	if m.ErrorCount != 1100 || m.Connections.Reconnects != 1100 || m.Connections.Lost != 1102 {
		t.Errorf("errors %d, connections %+v", m.ErrorCount, m.Connections)
	}
	if m.Connections.Clients != 4 || m.Deliver.Count != 4 {
		t.Errorf("clients %d, deliveries %d: want the merged histograms' counts", m.Connections.Clients, m.Deliver.Count)
	}
	// From a's first send (t0+1s) to b's last delivery (t0+1000s).
	if want := float64(m.Counts.Unique) / 999; m.Throughput != want {
		t.Errorf("throughput %v, want %v", m.Throughput, want)
	}
	if !m.Started.Equal(t0) || m.ElapsedSec != 12.5 {
		t.Errorf("started %v, elapsed %v: want t0 and 12.5 s", m.Started, m.ElapsedSec)
	}
	if m.Flood == nil || *m.Flood != (FloodResult{Clients: 2, Sent: 1100, Acked: 1100, Rate: 2}) {
		t.Errorf("flood %+v", m.Flood)
	}
	if m.Client.CPUSeconds != 4 || m.Client.PeakRSSMB != 100 || m.Client.PID != 0 {
		t.Errorf("client %+v: want the agents' sums", m.Client)
	}
	// Errors and lost samples: each agent's in turn, bounded.
	if len(m.Errors) != maxErrorSamples || m.Errors[0] != "a: e0" || m.Errors[1] != "b: e0" || m.Errors[19] != "b: e9" {
		t.Errorf("errors %q", m.Errors)
	}
	if len(m.LostSamples) != maxLostSamples || m.LostSamples[1] != "b-l0" {
		t.Errorf("lost samples %q", m.LostSamples)
	}
	if !slices.Equal(m.Connections.LossReasons, []string{"a: eof", "b: eof"}) {
		t.Errorf("loss reasons %q", m.Connections.LossReasons)
	}
	if m.RunTag != "taga,tagb" || m.Broker != "tcp://b:1883" || len(m.Agents) != 2 || m.Agents[1].Users != 4 || m.Raw != nil {
		t.Errorf("run tag %q, broker %q, agents %+v, raw %v", m.RunTag, m.Broker, m.Agents, m.Raw)
	}

	// What cannot be merged is refused.
	noRaw := *a
	noRaw.Raw = nil
	drain := *b
	drain.Drain = &DrainResult{}
	short := *b
	short.Series = []Point{{T: 1}}
	for name, reps := range map[string][]*Report{
		"none": nil, "no raw data": {a, &noRaw}, "results cannot be merged": {a, &drain}, "series points": {a, &short},
	} {
		if _, err := MergeReports(reps); err == nil || !strings.Contains(err.Error(), name) && name != "none" {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

// TestMergeSeries aligns the agents' series by index: rates, duplicates,
// errors and connections summed, each second's p99 that of the agents'
// histograms of that second merged.
func TestMergeSeries(t *testing.T) {
	// Second 1: agent a has 98 deliveries at 1 ms and 2 at 100 ms (its p99
	// is 100 ms), agent b 100 at 1 ms: the p99 of their 200 is 1 ms,
	// where the larger of their p99s would say 100.
	aSec1 := append(slices.Repeat([]int64{1000}, 98), 100_000, 100_000)
	bSec1 := slices.Repeat([]int64{1000}, 100)
	a := &Report{Scenario: ScenarioChat, Series: []Point{
		{T: 1.001, Phase: phaseConnect, SentPerSec: 10, AckedPerSec: 9, DeliveredPerSec: 8, Duplicates: 1, Errors: 2, Connected: 5, ClientCPU: 10},
		{T: 2.001, Phase: phaseSend, SentPerSec: 100, DeliveredPerSec: 100, Connected: 5},
		{T: 2.5, Phase: phaseClose, Connected: 0},
	}}
	b := &Report{Scenario: ScenarioChat, Series: []Point{
		{T: 1.002, Phase: phaseSend, SentPerSec: 20, AckedPerSec: 19, DeliveredPerSec: 18, Duplicates: 3, Errors: 4, Connected: 7, ClientCPU: 30},
		{T: 2.002, Phase: phaseSend, SentPerSec: 200, DeliveredPerSec: 200, Connected: 7},
	}}
	a.Series[0].P99Ms, b.Series[0].P99Ms = 100, 1
	a.Raw = rawOf(t, "a", nil, [][]int64{aSec1, {5000}, nil}, 0, 0)
	b.Raw = rawOf(t, "b", nil, [][]int64{bSec1, {7000}}, 0, 0)
	m, err := MergeReports([]*Report{a, b})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Series) != 3 {
		t.Fatalf("%d points, want 3", len(m.Series))
	}
	want0 := Point{T: 1.002, Phase: "connect/send", SentPerSec: 30, AckedPerSec: 28, DeliveredPerSec: 26,
		Duplicates: 4, Errors: 6, Connected: 12, ClientCPU: 40, P99Ms: 1}
	if m.Series[0] != want0 {
		t.Errorf("second 1: %+v, want %+v", m.Series[0], want0)
	}
	sec2 := newHist()
	for _, us := range []int64{5000, 7000} {
		recordMicros(sec2, us*1000)
	}
	if p := m.Series[1]; p.Phase != phaseSend || p.SentPerSec != 300 || p.Connected != 12 || p.P99Ms != PercentilesOf(sec2).P99 {
		t.Errorf("second 2: %+v", p)
	}
	// Only a was still running at its third point.
	if p := m.Series[2]; p != a.Series[2] {
		t.Errorf("third point %+v, want a's %+v", p, a.Series[2])
	}
	// A throughput with no delivery stays 0.
	if m.Throughput != 0 {
		t.Errorf("throughput %v without deliveries", m.Throughput)
	}
}

// TestMergeReportsOne merges the report of one real run, sent through
// JSON as an agent's is: every figure stays what it was.
func TestMergeReportsOne(t *testing.T) {
	cfg := testConfig(ScenarioChat, startChatd(t))
	cfg.Devices = 2 // sent copies too
	cfg.Raw = true
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	if rep.Raw == nil || len(rep.Raw.Series) != len(rep.Series) || rep.Raw.FirstSend == 0 {
		t.Fatalf("raw data %+v for %d points", rep.Raw, len(rep.Series))
	}
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var wire Report
	if err := json.Unmarshal(b, &wire); err != nil {
		t.Fatal(err)
	}
	m, err := MergeReports([]*Report{&wire})
	if err != nil {
		t.Fatal(err)
	}
	want, err := reportFigures(rep)
	if err != nil {
		t.Fatal(err)
	}
	got, err := reportFigures(m)
	if err != nil {
		t.Fatal(err)
	}
	for k, w := range want {
		switch {
		case strings.HasPrefix(k, "raw.") || k == "client.pid":
			continue
		case k == "elapsed_s":
			// Through a time.Time and back: within a microsecond.
			if g := got[k]; g-w > 1e-6 || w-g > 1e-6 {
				t.Errorf("%s: merged %v, alone %v", k, g, w)
			}
		case got[k] != w:
			t.Errorf("%s: merged %v, alone %v", k, got[k], w)
		}
	}
	if !reflect.DeepEqual(m.Series, rep.Series) {
		t.Errorf("series differ:\nmerged %+v\nalone  %+v", m.Series, rep.Series)
	}
	if !reflect.DeepEqual(m.LatencyBins, rep.LatencyBins) || !slices.Equal(m.LostSamples, rep.LostSamples) {
		t.Errorf("bins or lost samples differ")
	}
	if m.Counts.CopiesReceived == 0 || m.Copy.Count != m.Counts.CopiesReceived {
		t.Errorf("sent copies: counts %+v, latency %+v", m.Counts, m.Copy)
	}
}
