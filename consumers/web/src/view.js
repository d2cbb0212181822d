// What the page shows of the decrypted rows: a tab per stream with its charts (charts.js), a
// filter (filter.js) and a table of the newest rows, formatted (format.js); pause freezes the
// tables and charts while rows keep being counted. An OTLP stream's rows are export requests:
// its table shows a line per span, log record or data point (otlp.js), at most 200 a batch.
// Cells are set with textContent only: decrypted rows never become markup, and no row leaves
// the page.

import { streamCharts } from "./charts.js";
import { parseFilter } from "./filter.js";
import { formatCell, kindOf, raw } from "./format.js";
import { LINES_PER_BATCH, SIGNALS, expand } from "./otlp.js";

/** rows a table shows */
export const SHOWN = 50;
/** rows a stream keeps for its filter */
export const KEPT = 1000;
/**
 * columns a table shows, the first seen: every one of the built-in sources (host_metrics has
 * 15), where a terminal shows 9 (consumers/_view.py); the filter reads them all
 */
export const MAX_COLUMNS = 16;
/** a cell shows at most this many characters (a 16 KiB value would cost layout every frame) */
const MAX_CELL = 200;
const TABLE_EVERY_MS = 250;
/** @type {Record<string, string>} */
const EXAMPLES = {
  http_events: "resp_status>=500 latency_ns>20ms",
  host_metrics: "cpu_percent>50 net_recv_rate>1MiB",
  otlp_traces: "status~error duration_ns>100ms",
  otlp_metrics: "type=histogram name~http",
  otlp_logs: "severity~error checkout",
};
const CHARTS_EVERY_MS = 1000;

/** @param {string} tag @param {string} [text] @param {string} [cls] */
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

const n = (/** @type {number} */ x) => x.toLocaleString("en-US");

/**
 * The rows' columns not yet in `columns`, appended while it has fewer than MAX_COLUMNS.
 * @param {string[]} columns
 * @param {Record<string, unknown>[]} rows
 */
export function addColumns(columns, rows) {
  for (const row of rows) {
    for (const k of Object.keys(row)) {
      if (columns.length >= MAX_COLUMNS) return;
      if (!columns.includes(k)) columns.push(k);
    }
  }
}

class StreamView {
  /**
   * @param {string} stream
   * @param {HTMLElement} tabs
   * @param {HTMLElement} parent
   * @param {(s: StreamView) => void} select
   */
  constructor(stream, tabs, parent, select) {
    this.stream = stream;
    /** @type {string[]} */
    this.columns = [];
    /** @type {Record<string, unknown>[]} newest last */
    this.rows = [];
    this.total = 0;
    /** an OTLP stream's signal; its items in all, not shown (over a batch's cap), undecodable */
    this.otlp = SIGNALS[stream] ?? null;
    this.items = 0;
    this.hidden = 0;
    this.undecodable = 0;
    this.undecodableReason = "";
    this.dirty = true;
    /** @type {import("./filter.js").RowTest | null} */
    this.test = null;

    this.tab = el("button", stream, "tab");
    this.tab.setAttribute("role", "tab");
    this.tab.dataset.stream = stream;
    this.tab.onclick = () => select(this);
    tabs.append(this.tab);

    this.section = el("section");
    this.section.dataset.stream = stream;
    this.section.setAttribute("role", "tabpanel");
    const charts = el("div", undefined, "charts");
    this.count = el("p", "0 rows received", "count");
    this.filter = /** @type {HTMLInputElement} */ (el("input", undefined, "filter"));
    this.filter.type = "search";
    this.filter.placeholder = `filter: ${EXAMPLES[stream] ?? "column>=number column=text text"}`;
    this.filter.setAttribute("aria-label", `filter the rows of ${stream}`);
    this.filterError = el("span", "", "filter-error");
    this.filter.oninput = () => this.setFilter(this.filter.value);
    const head = el("div", undefined, "table-head");
    head.append(this.count, this.filter, this.filterError);
    this.table = el("table", undefined, "rows");
    const wrap = el("div", undefined, "table-wrap");
    wrap.append(this.table);
    this.section.append(charts, head, wrap);
    parent.append(this.section);
    this.charts = streamCharts(stream, charts, this.otlp?.noun ?? "rows");
  }

  /** @param {string} text */
  setFilter(text) {
    try {
      this.test = parseFilter(text);
      this.filterError.textContent = "";
      this.filter.removeAttribute("aria-invalid");
    } catch (err) {
      this.filterError.textContent = /** @type {Error} */ (err).message;
      this.filter.setAttribute("aria-invalid", "true");
    }
    this.dirty = true;
  }

  /** @param {Record<string, unknown>[]} batch @param {number} nowMs */
  add(batch, nowMs) {
    let rows = batch;
    let count = batch.length;
    if (this.otlp !== null) {
      const got = expand(this.otlp.signal, batch);
      rows = got.lines;
      count = got.items;
      this.items += got.items;
      this.hidden += got.items - got.lines.length;
      this.undecodable += got.undecodable;
      if (got.undecodable) this.undecodableReason = got.reason;
    }
    this.total += batch.length;
    addColumns(this.columns, rows);
    this.rows.push(...rows);
    if (this.rows.length > KEPT) this.rows.splice(0, this.rows.length - KEPT);
    this.charts.add(rows, nowMs, count);
    this.dirty = true;
  }

  /** the newest rows that pass the filter, newest first, and how many of the kept ones do */
  shown() {
    const test = this.test;
    /** @type {Record<string, unknown>[]} */
    const out = [];
    let matching = 0;
    for (let i = this.rows.length - 1; i >= 0; i--) {
      if (test !== null && !test(this.rows[i])) continue;
      matching += 1;
      if (out.length < SHOWN) out.push(this.rows[i]);
      else if (test === null) break;
    }
    return { rows: out, matching: test === null ? this.rows.length : matching };
  }

  /** @param {boolean} paused */
  renderCounts(paused) {
    const label = `${this.stream} · ${n(this.total)}`;
    if (this.tab.textContent !== label) this.tab.textContent = label; // every frame: no relayout
    if (paused) this.count.dataset.paused = "true";
    else delete this.count.dataset.paused;
  }

  renderTable() {
    if (!this.dirty) return;
    this.dirty = false;
    const { rows, matching } = this.shown();
    const received = [`${n(this.total)} rows received`];
    if (this.otlp !== null) {
      received[0] = `${n(this.total)} ${this.total === 1 ? "request" : "requests"} received`;
      received.push(`${n(this.items)} ${this.otlp.noun}`);
      const cap = `at most ${LINES_PER_BATCH} a batch`;
      if (this.hidden) received.push(`${n(this.hidden)} not shown (${cap})`);
      if (this.undecodable) received.push(`${n(this.undecodable)} undecodable`);
    }
    this.count.title = this.undecodableReason && `last undecodable: ${this.undecodableReason}`;
    const lines = this.otlp === null ? "" : "lines ";
    this.count.textContent =
      this.test === null
        ? `${received.join(" · ")} · the newest ${n(rows.length)} ${lines}below`
        : `${received.join(" · ")} · ${n(matching)} of the newest ${n(this.rows.length)} ` +
          `${lines}match the filter · the newest ${n(rows.length)} of them below`;
    const head = el("tr");
    for (const c of this.columns) head.append(el("th", c, kindOf(c) === "plain" ? "" : "num"));
    const body = rows.map((row) => {
      const tr = el("tr");
      for (const c of this.columns) {
        const text = formatCell(c, row[c]);
        const td = el("td", text.length > MAX_CELL ? `${text.slice(0, MAX_CELL)}…` : text);
        if (kindOf(c) !== "plain" || typeof row[c] === "number" || typeof row[c] === "bigint") {
          td.className = "num";
        }
        const exact = raw(row[c]);
        if (exact !== text) td.title = exact.slice(0, MAX_CELL);
        tr.append(td);
      }
      return tr;
    });
    const thead = el("thead");
    thead.append(head);
    const tbody = el("tbody");
    tbody.append(...body);
    this.table.replaceChildren(thead, tbody);
  }
}

/** The tabs, charts and tables of the page's streams. */
export class View {
  /**
   * @param {string[]} streams
   * @param {{tabs: HTMLElement, panels: HTMLElement, pause: HTMLButtonElement}} at
   */
  constructor(streams, at) {
    this.paused = false;
    this.pause = at.pause;
    this.pause.onclick = () => this.setPaused(!this.paused);
    /** @type {Map<string, StreamView>} */
    this.streams = new Map();
    const select = (/** @type {StreamView} */ chosen) => {
      for (const s of this.streams.values()) {
        const on = s === chosen;
        s.tab.setAttribute("aria-selected", String(on));
        s.section.hidden = !on;
      }
    };
    for (const s of streams) this.streams.set(s, new StreamView(s, at.tabs, at.panels, select));
    const first = this.streams.values().next().value;
    if (first !== undefined) select(first);
    this.tableAt = -Infinity;
    this.chartsAt = -Infinity;
  }

  /** @param {boolean} paused */
  setPaused(paused) {
    this.paused = paused;
    this.pause.textContent = paused ? "resume" : "pause";
    this.pause.setAttribute("aria-pressed", String(paused));
    for (const s of this.streams.values()) s.dirty = true;
  }

  /** @param {string} stream @param {Record<string, unknown>[]} rows @param {number} nowMs */
  add(stream, rows, nowMs) {
    this.streams.get(stream)?.add(rows, nowMs);
  }

  /** called every frame: counts always, tables and charts at their pace unless paused */
  render(/** @type {number} */ nowMs) {
    for (const s of this.streams.values()) s.renderCounts(this.paused);
    if (this.paused) return;
    if (nowMs - this.tableAt >= TABLE_EVERY_MS) {
      this.tableAt = nowMs;
      for (const s of this.streams.values()) s.renderTable();
    }
    if (nowMs - this.chartsAt >= CHARTS_EVERY_MS) {
      this.chartsAt = nowMs;
      for (const s of this.streams.values()) s.charts.draw(Date.now());
    }
  }
}
