package loadtest

import (
	"encoding/json"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Threshold is a pass/fail condition on one figure of the report, as CI
// gates a run: "p99(send->deliver)<5ms", "lost==0", "throughput>=2000".
type Threshold struct {
	// Expr is the condition as written.
	Expr string `json:"threshold"`
	// Figure is the report figure it reads, as a JSON path of the report:
	// deliver_latency.p99_ms, counts.lost, throughput_per_s.
	Figure string `json:"figure"`
	// Op is one of < <= > >= == !=.
	Op string `json:"op"`
	// Value is the bound, in the figure's unit (milliseconds for latencies).
	Value float64 `json:"value"`
}

// ThresholdResult is one threshold checked against a run.
type ThresholdResult struct {
	Threshold
	// Actual is the figure the run measured.
	Actual float64 `json:"actual"`
	// Passed says the condition held.
	Passed bool `json:"passed"`
}

// Verdict is every threshold of a run checked.
type Verdict struct {
	// Passed says every threshold held.
	Passed bool `json:"passed"`
	// Results are the thresholds in the order given.
	Results []ThresholdResult `json:"results"`
}

// Failed returns the thresholds that did not hold.
func (v *Verdict) Failed() []ThresholdResult {
	var out []ThresholdResult
	for _, r := range v.Results {
		if !r.Passed {
			out = append(out, r)
		}
	}
	return out
}

// latencyNames maps the latency rows of the report, as the table names
// them, to their JSON fields.
var latencyNames = map[string]string{
	"send->deliver":    "deliver_latency",
	"send->puback":     "ack_latency",
	"send->receipt":    "receipt_latency",
	"send->sent copy":  "copy_latency",
	"send->copy":       "copy_latency",
	"connect->connack": "connections.connack_latency",
	"connect->suback":  "connections.suback_latency",
}

// statFields maps the statistics a latency threshold may name to the
// fields of Percentiles.
var statFields = map[string]string{
	"p50": "p50_ms", "p90": "p90_ms", "p99": "p99_ms", "p99.9": "p99_9_ms", "p999": "p99_9_ms",
	"max": "max_ms", "mean": "mean_ms", "avg": "mean_ms", "count": "count",
}

// aliases are short names of figures that thresholds use most.
var aliases = map[string]string{
	"lost": "counts.lost", "duplicates": "counts.duplicates", "refused": "counts.refused",
	"misrouted": "counts.misrouted", "order_violations": "counts.order_violations",
	"in_flight": "counts.in_flight", "sent": "counts.sent", "acked": "counts.acked",
	"delivered": "counts.delivered", "unique": "counts.unique",
	"throughput": "throughput_per_s", "send_rate": "send_rate_per_s",
}

var thresholdRE = regexp.MustCompile(`^\s*(.+?)\s*(<=|>=|==|!=|<|>)\s*([-+0-9.eE]+)\s*(us|µs|ms|s|m)?\s*$`)
var statRE = regexp.MustCompile(`^([a-z0-9.]+)\((.+)\)$`)

// ParseThreshold reads a threshold: FIGURE OP VALUE, where FIGURE is
// STAT(LATENCY) (p50, p90, p99, p99.9, max, mean or count of
// send->deliver, send->PUBACK, send->receipt, send->sent copy,
// CONNECT->CONNACK, CONNECT->SUBACK), a short name (lost, duplicates,
// refused, misrouted, order_violations, in_flight, sent, acked, delivered,
// unique, throughput, send_rate), reason(PACKET:CODE) for how many times
// the broker answered with an MQTT 5 reason code (reason(puback:0x97),
// 0 when it never did), or any number of the JSON report by its path
// (connections.reconnects, server.cpu_percent). A latency's VALUE
// may carry a unit: us, ms (the default), s, m.
func ParseThreshold(s string) (Threshold, error) {
	m := thresholdRE.FindStringSubmatch(s)
	if m == nil {
		return Threshold{}, fmt.Errorf("threshold %q: want FIGURE OP VALUE, e.g. 'p99(send->deliver)<5ms' or 'lost==0'", s)
	}
	name, op, unit := strings.ToLower(strings.TrimSpace(m[1])), m[2], m[4]
	v, err := strconv.ParseFloat(m[3], 64)
	if err != nil {
		return Threshold{}, fmt.Errorf("threshold %q: value: %w", s, err)
	}
	t := Threshold{Expr: strings.TrimSpace(s), Op: op, Value: v}
	latency := false
	switch sm := statRE.FindStringSubmatch(name); {
	case sm != nil && sm[1] == "reason":
		fig, err := reasonFigure(sm[2])
		if err != nil {
			return Threshold{}, fmt.Errorf("threshold %q: %w", s, err)
		}
		t.Figure = fig
	case sm != nil:
		field, ok := statFields[sm[1]]
		if !ok {
			return Threshold{}, fmt.Errorf("threshold %q: statistic %q: want one of p50, p90, p99, p99.9, max, mean, count", s, sm[1])
		}
		row, ok := latencyNames[strings.Join(strings.Fields(sm[2]), " ")]
		if !ok {
			return Threshold{}, fmt.Errorf("threshold %q: latency %q: want one of %s", s, sm[2], strings.Join(slices.Sorted(maps.Keys(latencyNames)), ", "))
		}
		t.Figure, latency = row+"."+field, field != "count"
	case aliases[name] != "":
		t.Figure = aliases[name]
	default:
		t.Figure = name
	}
	if unit != "" {
		if !latency && !strings.HasSuffix(t.Figure, "_ms") {
			return Threshold{}, fmt.Errorf("threshold %q: a unit (%s) is only for latencies", s, unit)
		}
		t.Value *= map[string]float64{"us": 0.001, "µs": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]
	}
	return t, nil
}

// reasonPrefix starts the figures of the MQTT 5 reason codes.
const reasonPrefix = "reason_codes."

// reasonFigure reads the PACKET:CODE of reason(PACKET:CODE), e.g.
// puback:0x97, and returns its figure: reason_codes.puback.0x97.
func reasonFigure(arg string) (string, error) {
	packet, code, ok := strings.Cut(strings.TrimSpace(arg), ":")
	packet = strings.ToUpper(strings.TrimSpace(packet))
	switch packet {
	case packetConnack, packetPuback, packetSuback, packetDisconnect:
	default:
		ok = false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(code), 0, 8)
	if !ok || err != nil {
		return "", fmt.Errorf("reason(%s): want reason(PACKET:CODE), PACKET one of connack, puback, suback, disconnect and CODE a byte such as 0x97", arg)
	}
	return reasonFigureOf(packet, byte(n)), nil
}

// reasonFigureOf names the figure of one reason code of one packet.
func reasonFigureOf(packet string, code byte) string {
	return fmt.Sprintf("%s%s.0x%02x", reasonPrefix, strings.ToLower(packet), code)
}

// Evaluate checks thresholds against rep. A threshold naming a figure the
// report does not have is an error, so that a misspelt figure never
// passes silently.
func Evaluate(rep *Report, thresholds []Threshold) (*Verdict, error) {
	figures, err := reportFigures(rep)
	if err != nil {
		return nil, err
	}
	v := &Verdict{Passed: true}
	for _, t := range thresholds {
		actual, ok := figures[t.Figure]
		if !ok && strings.HasPrefix(t.Figure, reasonPrefix) {
			// A reason code the broker never sent was counted 0 times.
			ok = true
		}
		if !ok {
			return nil, fmt.Errorf("threshold %q: the report has no figure %s (see the JSON report for its figures)", t.Expr, t.Figure)
		}
		r := ThresholdResult{Threshold: t, Actual: actual, Passed: holds(actual, t.Op, t.Value)}
		v.Passed = v.Passed && r.Passed
		v.Results = append(v.Results, r)
	}
	return v, nil
}

// holds reports whether a OP b.
func holds(a float64, op string, b float64) bool {
	switch op {
	case "<":
		return a < b
	case "<=":
		return a <= b
	case ">":
		return a > b
	case ">=":
		return a >= b
	case "==":
		return a == b
	default:
		return a != b
	}
}

// reportFigures flattens the numbers of rep's JSON form by path, which is
// what makes every figure of the report a threshold's (the per-second
// series and histogram bins, which are lists, are left out). Figures the
// JSON omits when zero (copy latency without several devices) read as 0.
func reportFigures(rep *Report) (map[string]float64, error) {
	r := *rep
	r.Series, r.LatencyBins, r.Verdict = nil, nil, nil
	b, err := json.Marshal(&r)
	if err != nil {
		return nil, fmt.Errorf("thresholds: encode report: %w", err)
	}
	var tree map[string]any
	if err := json.Unmarshal(b, &tree); err != nil {
		return nil, fmt.Errorf("thresholds: decode report: %w", err)
	}
	out := map[string]float64{}
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, c := range v {
				walk(prefix+k+".", c)
			}
		case float64:
			out[strings.TrimSuffix(prefix, ".")] = v
		}
	}
	walk("", tree)
	for _, rc := range rep.ReasonCodes {
		out[reasonFigureOf(rc.Packet, rc.Code)] = float64(rc.Count)
	}
	for _, row := range latencyNames {
		for _, f := range statFields {
			if _, ok := out[row+"."+f]; !ok {
				out[row+"."+f] = 0
			}
		}
	}
	return out, nil
}
