// Reads the Prometheus text format (https://prometheus.io/docs/instrumenting/exposition_formats/)
// that chatd's /metrics serves, enough for the dashboard: samples by name
// with their labels, and percentiles from a histogram's buckets.

/** One sample. */
export interface Sample {
  labels: Record<string, string>;
  value: number;
}

/** One scrape: samples by metric name, and when it was taken (Unix seconds). */
export interface Metrics {
  at: number;
  samples: Map<string, Sample[]>;
}

const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

/** Parses a scrape; lines it does not understand are skipped. */
export function parseMetrics(text: string): Metrics {
  const samples = new Map<string, Sample[]>();
  for (const l of text.split("\n")) {
    if (!l || l.startsWith("#")) continue;
    const m = line.exec(l);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const [, k, v] of (m[2] ?? "").matchAll(label)) labels[k] = v.replace(/\\(.)/g, (_s, c: string) => (c === "n" ? "\n" : c));
    const value = m[3] === "+Inf" ? Infinity : m[3] === "-Inf" ? -Infinity : Number(m[3]);
    let list = samples.get(m[1]);
    if (!list) samples.set(m[1], (list = []));
    list.push({ labels, value });
  }
  return { at: 0, samples };
}

/** The sum of a metric's samples over all labels; 0 when absent. */
export function sum(m: Metrics, name: string): number {
  return (m.samples.get(name) ?? []).reduce((a, s) => a + s.value, 0);
}

/**
 * The q-quantile of what histogram `name` observed between scrapes old and
 * now, interpolated within its bucket as Prometheus's histogram_quantile
 * does; null when it observed nothing.
 */
export function quantile(now: Metrics, old: Metrics, name: string, q: number): number | null {
  const buckets = (m: Metrics) => {
    const by = new Map<number, number>();
    for (const s of m.samples.get(`${name}_bucket`) ?? []) {
      const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
      by.set(le, (by.get(le) ?? 0) + s.value);
    }
    return by;
  };
  const a = buckets(now);
  const b = buckets(old);
  const les = [...a.keys()].sort((x, y) => x - y);
  const counts = les.map((le) => (a.get(le) ?? 0) - (b.get(le) ?? 0));
  const total = counts[counts.length - 1] ?? 0;
  if (total <= 0) return null;
  const rank = q * total;
  for (let i = 0; i < les.length; i++) {
    if (counts[i] >= rank) {
      const upper = les[i];
      const lower = i === 0 ? 0 : les[i - 1];
      if (upper === Infinity) return lower;
      const below = i === 0 ? 0 : counts[i - 1];
      const inBucket = counts[i] - below;
      return inBucket <= 0 ? upper : lower + ((upper - lower) * (rank - below)) / inBucket;
    }
  }
  return les.length > 1 ? les[les.length - 2] : null;
}
