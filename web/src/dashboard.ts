// The live dashboard: the server's own /metrics, read every second and
// drawn as charts of the last five minutes.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { parseMetrics, quantile, sum, type Metrics } from "./metrics.ts";

/** Seconds of history the charts keep. */
const span = 300;
/** Seconds of histogram the latency percentiles are taken over. */
const histWindow = 5;

/** One chart: its series, computed from two scrapes a second apart. */
interface Panel {
  id: string;
  title: string;
  unit: string;
  series: { label: string; color: string; value: (now: Metrics, prev: Metrics, dt: number, old: Metrics) => number | null }[];
}

const rate = (name: string) => (now: Metrics, prev: Metrics, dt: number) => Math.max(0, (sum(now, name) - sum(prev, name)) / dt);
const gauge = (name: string, scale = 1) => (now: Metrics) => sum(now, name) / scale;
const latency = (q: number) => (now: Metrics, _p: Metrics, _dt: number, old: Metrics) => {
  const v = quantile(now, old, "chatd_delivery_seconds", q);
  return v === null ? null : v * 1000;
};

const panels: Panel[] = [
  { id: "connections", title: "Connections", unit: "", series: [{ label: "connected", color: "#1a73e8", value: gauge("chatd_connections") }] },
  {
    id: "messages", title: "Messages per second", unit: "/s", series: [
      { label: "stored", color: "#1a73e8", value: rate("chatd_messages_stored_total") },
      { label: "sent to devices", color: "#2e9d50", value: rate("chatd_messages_sent_total") },
      { label: "acknowledged", color: "#e37400", value: rate("chatd_messages_acked_total") },
    ],
  },
  { id: "queue", title: "Queue depth", unit: " msgs", series: [{ label: "waiting", color: "#9334e6", value: gauge("chatd_queue_messages") }] },
  {
    id: "latency", title: `Delivery latency, last ${histWindow} s`, unit: " ms", series: [
      { label: "p50", color: "#2e9d50", value: latency(0.5) },
      { label: "p90", color: "#e37400", value: latency(0.9) },
      { label: "p99", color: "#d93025", value: latency(0.99) },
    ],
  },
  {
    id: "refusals", title: "Refusals and disconnects per second", unit: "/s", series: [
      { label: "publishes refused", color: "#d93025", value: rate("chatd_refusals_total") },
      { label: "disconnects", color: "#5f6368", value: rate("chatd_disconnects_total") },
    ],
  },
  {
    id: "disk", title: "Disk", unit: " MiB", series: [
      { label: "queue on disk", color: "#1a73e8", value: gauge("chatd_disk_bytes", 1 << 20) },
      { label: "free", color: "#2e9d50", value: gauge("chatd_disk_free_bytes", 1 << 20) },
    ],
  },
];

interface Drawn {
  panel: Panel;
  plot: uPlot;
  data: (number | null)[][];
  box: HTMLElement;
  now: HTMLElement;
}

const drawn: Drawn[] = [];
const scrapes: Metrics[] = [];

function fmt(v: number | null | undefined, unit: string): string {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const s = Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
  return s + unit;
}

function setup(): void {
  const root = document.getElementById("charts")!;
  for (const panel of panels) {
    const box = document.createElement("section");
    box.className = "chart";
    box.dataset.chart = panel.id;
    const h = document.createElement("h2");
    const title = document.createElement("span");
    title.textContent = panel.title;
    const now = document.createElement("span");
    now.className = "now";
    h.append(title, now);
    const plotEl = document.createElement("div");
    box.append(h, plotEl);
    root.append(box);
    const data: (number | null)[][] = [[], ...panel.series.map(() => [])];
    const plot = new uPlot(
      {
        width: Math.max(400, box.clientWidth - 20), height: 200,
        series: [{}, ...panel.series.map((s) => ({ label: s.label, stroke: s.color, width: 2, spanGaps: false }))],
        axes: [{}, { size: 60 }],
        scales: { y: { range: (_u, _min, max) => [0, Math.max(1, max * 1.1)] } },
      },
      data as uPlot.AlignedData,
      plotEl,
    );
    drawn.push({ panel, plot, data, box, now });
  }
}

async function scrape(): Promise<void> {
  const state = document.getElementById("dash-state")!;
  let m: Metrics;
  try {
    const res = await fetch("metrics", { cache: "no-store" });
    if (!res.ok) throw new Error(`${res.status}`);
    m = parseMetrics(await res.text());
    state.textContent = "";
  } catch (err) {
    state.textContent = `metrics unreachable (${err}); retrying`;
    return;
  }
  m.at = Date.now() / 1000;
  scrapes.push(m);
  if (scrapes.length > histWindow + 1) scrapes.shift();
  if (scrapes.length < 2) return;
  const prev = scrapes[scrapes.length - 2];
  const old = scrapes[0];
  const dt = Math.max(0.001, m.at - prev.at);
  for (const d of drawn) {
    d.data[0].push(m.at);
    const values = d.panel.series.map((s) => s.value(m, prev, dt, old));
    values.forEach((v, i) => d.data[i + 1].push(v));
    if (d.data[0].length > span) for (const col of d.data) col.shift();
    d.plot.setData(d.data as uPlot.AlignedData);
    d.now.textContent = d.panel.series.map((s, i) => `${s.label} ${fmt(values[i], d.panel.unit)}`).join(" · ");
    // For tests and scripts: how many points, and the largest of the first series.
    d.box.dataset.points = String(d.data[0].length);
    d.box.dataset.max = String(Math.max(0, ...d.data.slice(1).flatMap((c) => c.filter((v): v is number => v !== null))));
  }
}

function resize(): void {
  for (const d of drawn) d.plot.setSize({ width: Math.max(400, d.box.clientWidth - 20), height: 200 });
}

setup();
addEventListener("resize", resize);
void scrape();
setInterval(() => void scrape(), 1000);
