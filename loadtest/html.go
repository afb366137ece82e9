package loadtest

import (
	_ "embed"
	"fmt"
	"html/template"
	"math"
	"os"
	"strings"
)

//go:embed report.html.tmpl
var reportTemplate string

var reportPage = template.Must(template.New("report").Funcs(template.FuncMap{
	"f1": func(v float64) string { return fmt.Sprintf("%.1f", v) },
	"f2": func(v float64) string { return fmt.Sprintf("%.2f", v) },
}).Parse(reportTemplate))

// WriteHTML writes a self-contained HTML report, charts included as inline
// SVG, to path.
func (rep *Report) WriteHTML(path string) error {
	var b strings.Builder
	if err := rep.renderHTML(&b); err != nil {
		return err
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write HTML report: %w", err)
	}
	return nil
}

func (rep *Report) renderHTML(b *strings.Builder) error {
	var table strings.Builder
	if err := rep.WriteTable(&table); err != nil {
		return err
	}
	xs := make([]float64, len(rep.Series))
	sent, delivered, p99 := make([]float64, len(rep.Series)), make([]float64, len(rep.Series)), make([]float64, len(rep.Series))
	cpu, rss, conns := make([]float64, len(rep.Series)), make([]float64, len(rep.Series)), make([]float64, len(rep.Series))
	for i, p := range rep.Series {
		xs[i] = p.T
		sent[i], delivered[i], p99[i] = p.SentPerSec, p.DeliveredPerSec, p.P99Ms
		cpu[i], rss[i], conns[i] = p.ServerCPU, p.ServerRSSMB, float64(p.Connected)
	}
	charts := []template.HTML{
		lineChart("Throughput (messages/s)", xs, []series{{"sent", sent}, {"delivered", delivered}}),
		lineChart("Send→deliver p99 per second (ms)", xs, []series{{"p99", p99}}),
		barChart("Send→deliver latency histogram (messages per latency bin, ms)", rep.LatencyBins),
		lineChart("Connected clients", xs, []series{{"connected", conns}}),
	}
	if rep.Server != nil {
		charts = append(charts,
			lineChart("Server CPU (% of one core)", xs, []series{{"cpu", cpu}}),
			lineChart("Server RSS (MiB)", xs, []series{{"rss", rss}}))
	}
	data := struct {
		R        *Report
		Table    string
		Charts   []template.HTML
		Failures []string
	}{rep, table.String(), charts, rep.Failures()}
	if err := reportPage.Execute(b, data); err != nil {
		return fmt.Errorf("render HTML report: %w", err)
	}
	return nil
}

// series is one named line of a chart.
type series struct {
	name string
	ys   []float64
}

// Chart geometry in SVG user units.
const (
	chartW, chartH         = 720.0, 240.0
	padL, padR, padT, padB = 64.0, 16.0, 28.0, 36.0
	plotW, plotH           = chartW - padL - padR, chartH - padT - padB
	chartTicks             = 5
	chartFont              = `font-family="sans-serif" font-size="11"`
	chartTitleFont         = `font-family="sans-serif" font-size="13" font-weight="bold"`
)

var palette = []string{"#4c78a8", "#f58518", "#54a24b", "#e45756"}

// lineChart draws series over xs as an SVG line chart.
func lineChart(title string, xs []float64, ss []series) template.HTML {
	var b strings.Builder
	openChart(&b, title)
	if len(xs) == 0 {
		fmt.Fprintf(&b, `<text x="%g" y="%g" %s>no data</text></svg>`, chartW/2, chartH/2, chartFont)
		return template.HTML(b.String())
	}
	xmax := xs[len(xs)-1]
	if xmax <= 0 {
		xmax = 1
	}
	ymax := 0.0
	for _, s := range ss {
		for _, y := range s.ys {
			ymax = math.Max(ymax, y)
		}
	}
	ymax = niceCeil(ymax)
	axes(&b, ymax, func(i int) string { return fmt.Sprintf("%.0fs", xmax*float64(i)/chartTicks) })
	for i, s := range ss {
		colour := palette[i%len(palette)]
		pts := make([]string, len(xs))
		for j, x := range xs {
			pts[j] = fmt.Sprintf("%.1f,%.1f", padL+plotW*x/xmax, padT+plotH*(1-s.ys[j]/ymax))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.6" points="%s"/>`, colour, strings.Join(pts, " "))
		legend(&b, i, s.name, colour)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// barChart draws latency bins as equal-width bars, which on the 1-2-5
// bins reads as a log-scale histogram.
func barChart(title string, bins []Bin) template.HTML {
	var b strings.Builder
	openChart(&b, title)
	if len(bins) == 0 {
		fmt.Fprintf(&b, `<text x="%g" y="%g" %s>no data</text></svg>`, chartW/2, chartH/2, chartFont)
		return template.HTML(b.String())
	}
	ymax := 0.0
	for _, bin := range bins {
		ymax = math.Max(ymax, float64(bin.Count))
	}
	ymax = niceCeil(ymax)
	axes(&b, ymax, nil)
	w := plotW / float64(len(bins))
	for i, bin := range bins {
		h := plotH * float64(bin.Count) / ymax
		x := padL + float64(i)*w
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#4c78a8"><title>%s–%s ms: %d</title></rect>`,
			x+1, padT+plotH-h, math.Max(w-2, 1), h, trimFloat(bin.FromMs), trimFloat(bin.ToMs), bin.Count)
		fmt.Fprintf(&b, `<text x="%.1f" y="%g" text-anchor="middle" %s>%s</text>`,
			x+w/2, padT+plotH+14, chartFont, trimFloat(bin.FromMs))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

func openChart(b *strings.Builder, title string) {
	fmt.Fprintf(b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %g %g" width="%g" height="%g">`, chartW, chartH, chartW, chartH)
	fmt.Fprintf(b, `<text x="%g" y="16" %s>%s</text>`, padL, chartTitleFont, template.HTMLEscapeString(title))
}

// axes draws the y grid with labels up to ymax and, when xLabel is set,
// the x tick labels.
func axes(b *strings.Builder, ymax float64, xLabel func(int) string) {
	for i := 0; i <= chartTicks; i++ {
		y := padT + plotH*(1-float64(i)/chartTicks)
		fmt.Fprintf(b, `<line x1="%g" y1="%.1f" x2="%g" y2="%.1f" stroke="#eee"/>`, padL, y, padL+plotW, y)
		fmt.Fprintf(b, `<text x="%g" y="%.1f" text-anchor="end" %s>%s</text>`, padL-6, y+4, chartFont, trimFloat(ymax*float64(i)/chartTicks))
		if xLabel != nil {
			x := padL + plotW*float64(i)/chartTicks
			fmt.Fprintf(b, `<text x="%.1f" y="%g" text-anchor="middle" %s>%s</text>`, x, padT+plotH+14, chartFont, xLabel(i))
		}
	}
	fmt.Fprintf(b, `<line x1="%g" y1="%g" x2="%g" y2="%g" stroke="#888"/>`, padL, padT+plotH, padL+plotW, padT+plotH)
	fmt.Fprintf(b, `<line x1="%g" y1="%g" x2="%g" y2="%g" stroke="#888"/>`, padL, padT, padL, padT+plotH)
}

func legend(b *strings.Builder, i int, name, colour string) {
	x := padL + float64(i)*110
	y := chartH - 8
	fmt.Fprintf(b, `<rect x="%g" y="%g" width="12" height="3" fill="%s"/>`, x, y-4, colour)
	fmt.Fprintf(b, `<text x="%g" y="%g" %s>%s</text>`, x+16, y, chartFont, template.HTMLEscapeString(name))
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

// trimFloat prints v compactly: no trailing zeros, at most three decimals.
func trimFloat(v float64) string {
	s := fmt.Sprintf("%.3f", v)
	s = strings.TrimRight(s, "0")
	return strings.TrimSuffix(s, ".")
}
