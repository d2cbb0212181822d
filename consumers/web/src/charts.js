// The charts of a stream's tab, drawn with uPlot (canvas, made for live time series: a redraw
// of a few thousand points takes well under a millisecond) from series.js. Each chart's
// element says how many points it holds (data-points), so a test can watch it grow.

import uPlot from "uplot";
import { duration, size } from "./format.js";
import { HttpSeries, MetricSeries, RowRate, STATUS_CLASSES } from "./series.js";

const HEIGHT = 150;
const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#0c8599"];
/** 2xx 3xx 4xx 5xx */
const STATUS_COLORS = ["#2b8a3e", "#2f6fde", "#e67700", "#c92a2a"];

/** @typedef {(v: number) => string} Fmt */
/** @typedef {import("./series.js").Aligned} Aligned */

const count = /** @type {Fmt} */ ((v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)));
const percent = /** @type {Fmt} */ ((v) => `${v.toFixed(0)} %`);
const fixed = /** @type {Fmt} */ ((v) => v.toFixed(2));
const rate = /** @type {Fmt} */ ((v) => `${size(v)}/s`);

/** A uPlot chart that takes the width of its cell. */
export class Chart {
  /**
   * @param {HTMLElement} parent
   * @param {{title: string, name: string, series: string[], colors?: string[], fmt: Fmt}} spec
   */
  constructor(parent, spec) {
    this.cell = document.createElement("figure");
    this.cell.className = "chart";
    this.cell.dataset.chart = spec.name;
    parent.append(this.cell);
    const colors = spec.colors ?? COLORS;
    const fmt = spec.fmt;
    /** @type {uPlot.Options} */
    const opts = {
      title: spec.title,
      width: 300,
      height: HEIGHT,
      cursor: { drag: { x: false, y: false } },
      legend: { live: false },
      scales: { x: { time: true } },
      series: [
        {},
        ...spec.series.map((label, i) => ({
          label,
          stroke: colors[i % colors.length],
          width: 2,
          points: { show: false },
        })),
      ],
      axes: [
        { size: 30 },
        { size: 72, values: (_u, splits) => splits.map((v) => (v === null ? "" : fmt(v))) },
      ],
    };
    this.plot = new uPlot(opts, [[], ...spec.series.map(() => [])], this.cell);
    // a hidden tab's cell is 0 wide: the chart takes its width when the tab is shown
    new ResizeObserver(() => {
      const width = Math.floor(this.cell.clientWidth);
      if (width > 0 && width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT });
    }).observe(this.cell);
    this.cell.dataset.points = "0";
  }

  /** @param {Aligned} data */
  draw(data) {
    this.plot.setData(/** @type {uPlot.AlignedData} */ (data));
    this.cell.dataset.points = String(data[0].length);
  }
}

/** @typedef {{add(rows: Record<string, unknown>[], nowMs: number, count?: number): void, draw(nowMs: number): void}} StreamCharts */

/**
 * The charts of one stream: its rows/s (or spans/s, ...: `unit`, counted by `add`'s `count`),
 * and what its rows say when the stream is known (http_events, host_metrics).
 * @param {string} stream
 * @param {HTMLElement} parent
 * @param {string} [unit]
 * @returns {StreamCharts}
 */
export function streamCharts(stream, parent, unit = "rows") {
  const rowRate = new RowRate();
  const rateChart = new Chart(parent, {
    title: `${unit}/s received`,
    name: "rows",
    series: [stream],
    fmt: count,
  });
  /** @type {{add(rows: Record<string, unknown>[], nowMs: number): void, draw(): void}[]} */
  const more = [];
  if (stream === "http_events") {
    const http = new HttpSeries();
    const latency = new Chart(parent, {
      title: "latency p50 · p99",
      name: "latency",
      series: ["p50", "p99"],
      fmt: duration,
    });
    const statuses = new Chart(parent, {
      title: "responses/s by status class",
      name: "status",
      series: STATUS_CLASSES,
      colors: STATUS_COLORS,
      fmt: count,
    });
    more.push({
      add: (rows, nowMs) => http.add(rows, nowMs),
      draw() {
        latency.draw(http.latency());
        statuses.draw(http.statuses());
      },
    });
  } else if (stream === "host_metrics") {
    for (const [name, title, columns, fmt] of /** @type {[string, string, string[], Fmt][]} */ ([
      ["percent", "cpu, memory, swap", ["cpu_percent", "mem_percent", "swap_percent"], percent],
      ["load", "load average (1 min)", ["load1"], fixed],
      ["network", "network", ["net_recv_rate", "net_send_rate"], rate],
    ])) {
      const metrics = new MetricSeries(columns);
      const chart = new Chart(parent, { title, name, series: columns, fmt });
      more.push({ add: (rows, nowMs) => metrics.add(rows, nowMs), draw: () => chart.draw(metrics.data()) });
    }
  }
  return {
    add(rows, nowMs, count = rows.length) {
      rowRate.add(count, nowMs);
      for (const m of more) m.add(rows, nowMs);
    },
    draw(nowMs) {
      rateChart.draw(rowRate.data(nowMs));
      for (const m of more) m.draw();
    },
  };
}
