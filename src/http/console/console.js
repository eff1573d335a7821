// The bus web console: plain JavaScript, no library, no build step. It talks to the server
// that served it, through the same endpoints as any client:
//   /console/live      figures every 2 s (Server-Sent Events, event "stats")
//   GET /?subject=…    the live tail (Server-Sent Events, event "msg")
//   POST /             publishing
//   GET|DELETE /consumers/{namespace}[/{name}]
// With authentication, a token typed into the page is kept in sessionStorage and sent as
// "Authorization: Bearer" (fetch) or "access_token=" (EventSource, which cannot set
// headers); with --auth-cookie the browser's cookie is enough. Data is only ever put into
// the page as text (textContent), never as markup.
"use strict";

const HISTORY_MS = 5 * 60 * 1000; // what the charts show at most
const MIN_SPAN_MS = 10 * 1000; // the shortest time axis of a chart
const MAX_ROWS = 500; // events the tail keeps on the page
const TOKEN_KEY = "bus-console-token";

const $ = (id) => document.getElementById(id);

// ---- helpers -----------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders(extra = {}) {
  const t = token();
  return t ? { ...extra, Authorization: `Bearer ${t}` } : extra;
}

// An EventSource URL with the token, if one was typed (the cookie needs nothing).
function streamUrl(path, params = new URLSearchParams()) {
  const t = token();
  if (t) params.set("access_token", t);
  const query = params.toString();
  return query ? `${path}?${query}` : path;
}

function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

function formatDuration(seconds) {
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = Math.floor(seconds % 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function formatRate(rate) {
  if (rate === undefined) return "–";
  return rate >= 100 ? rate.toFixed(0) : rate.toFixed(1);
}

// ---- authentication ----------------------------------------------------------------

// Shows the token form after a 401 or 403, with the server's words.
function askForToken(status, text) {
  const form = $("auth");
  form.hidden = false;
  // The server's words name what is missing (a token, or which grant on what).
  const why = status === 401
    ? "This server needs a token."
    : "This token may not do that here (the overview and consumers need the admin grant).";
  $("auth-message").textContent = `${why} ${text || ""}`.trim();
  $("auth-token").focus();
}

function setupAuth() {
  $("auth").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("auth-token").value.trim());
    $("auth-token").value = "";
    $("auth").hidden = true;
    live.connect();
    consumers.refreshAll();
  });
  $("auth-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("auth-message").textContent = "Token forgotten.";
  });
}

// fetch with the token; a 401 or 403 also brings up the token form.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (response.status === 401 || response.status === 403) {
    askForToken(response.status, await response.clone().text());
  }
  return response;
}

// ---- tabs --------------------------------------------------------------------------

const TABS = ["overview", "tail", "publish", "consumers"];

function showTab(name, focus = false) {
  if (!TABS.includes(name)) name = "overview";
  for (const tab of TABS) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(tab).hidden = !selected;
  }
  if (focus) $(`tab-${name}`).focus();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  // Charts drawn while hidden had no size.
  redrawCharts();
}

function setupTabs() {
  TABS.forEach((name, i) => {
    const tab = $(`tab-${name}`);
    tab.addEventListener("click", () => showTab(name));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) showTab(TABS[(i + step + TABS.length) % TABS.length], true);
    });
  });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  showTab(location.hash.slice(1));
}

// ---- charts ------------------------------------------------------------------------

const charts = new Set();

// A sparkline on a <canvas>: `points` are [time ms, value]; the line takes the canvas's
// CSS color, so light and dark mode both read.
function drawSparkline(canvas, points) {
  canvas._points = points;
  charts.add(canvas);
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  ctx.strokeStyle = style.borderTopColor;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(0, height - 0.5);
  ctx.lineTo(width, height - 0.5);
  ctx.stroke();
  if (points.length < 2) return;
  // The time axis grows with the history, from MIN_SPAN_MS to HISTORY_MS, so that a page
  // opened a moment ago already draws a line across.
  const now = Date.now();
  const span = Math.min(HISTORY_MS, Math.max(MIN_SPAN_MS, now - points[0][0]));
  const max = Math.max(1, ...points.map(([, v]) => v));
  const x = (t) => width - ((now - t) / span) * width;
  const y = (v) => height - 2 - (v / max) * (height - 4);
  ctx.strokeStyle = style.color;
  ctx.fillStyle = style.color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
  ctx.stroke();
  // The area under the line, faintly.
  ctx.lineTo(x(points[points.length - 1][0]), height);
  ctx.lineTo(x(points[0][0]), height);
  ctx.closePath();
  ctx.globalAlpha = 0.15;
  ctx.fill();
  ctx.globalAlpha = 1;
}

function redrawCharts() {
  for (const canvas of charts) {
    if (!canvas.isConnected) charts.delete(canvas);
    else drawSparkline(canvas, canvas._points || []);
  }
}

// Keeps the last HISTORY_MS of samples [time, value] under a key.
class History {
  constructor() {
    this.series = new Map();
  }

  push(key, time, value) {
    let list = this.series.get(key);
    if (!list) this.series.set(key, (list = []));
    list.push([time, value]);
    while (list.length && list[0][0] < time - HISTORY_MS) list.shift();
    return list;
  }

  get(key) {
    return this.series.get(key) || [];
  }
}

// ---- overview: the live figures ----------------------------------------------------

const rates = new History(); // `${ns}/publish`, `${ns}/delivered` → per second
const lags = new History(); // `${ns}/${consumer}` → lag
let previous = null; // the last stats frame, with its arrival time

function chartFigure(label, canvasLabel) {
  const value = el("span", { class: "rate-value", text: "–" });
  const canvas = el("canvas", { class: "spark", role: "img", "aria-label": canvasLabel });
  return { value, canvas, node: el("figure", { class: "chart" }, el("figcaption", {}, `${label} `, value), canvas) };
}

const FACTS = [
  ["events", "Events", (info) => String(info.events)],
  ["bytes", "Size", (info) => formatBytes(info.bytes)],
  ["range", "Positions kept", (info) => (info.last_index === null ? "empty" : `${info.first_index} … ${info.last_index}`)],
  ["first", "Oldest", (info) => formatTime(info.first_created_at)],
  ["last", "Newest", (info) => formatTime(info.last_created_at)],
  ["subscribers", "Subscribers now", (info) => String(info.subscribers)],
  ["consumers", "Durable consumers", (info) => String(info.consumers)],
];

// A namespace's card, built once; `update` fills it with each frame's figures (so that
// what a reader is looking at or has focused is not rebuilt every 2 s).
function namespaceCard(ns) {
  const list = el("dl", { class: "facts" });
  const fields = {};
  for (const [key, label] of FACTS) {
    fields[key] = el("dd", { "data-field": key, text: "–" });
    list.append(el("dt", { text: label }), fields[key]);
  }
  const pub = chartFigure("published/s", `Events published per second in ${ns}, last 5 minutes`);
  const del = chartFigure("delivered/s", `Events delivered per second in ${ns}, last 5 minutes`);
  const card = el("article", { class: "card", "data-namespace": ns, "aria-labelledby": `ns-${ns}` },
    el("h3", { id: `ns-${ns}`, text: ns }), list, el("div", { class: "charts" }, pub.node, del.node));
  const update = (info, rate) => {
    for (const [key, , text] of FACTS) fields[key].textContent = text(info);
    const [published, delivered] = rate || [];
    pub.value.textContent = formatRate(published);
    del.value.textContent = formatRate(delivered);
    drawSparkline(pub.canvas, rates.get(`${ns}/publish`));
    drawSparkline(del.canvas, rates.get(`${ns}/delivered`));
  };
  return { card, update };
}

const cards = new Map(); // namespace → its card

function renderStats(stats) {
  const now = Date.now();
  const health = $("health");
  health.dataset.state = stats.ready ? "ready" : "failing";
  health.textContent = stats.ready ? "ready" : `not ready: ${stats.ready_reason}`;
  $("version").textContent = stats.commit && stats.commit !== "unknown"
    ? `${stats.version} (${stats.commit.slice(0, 12)})`
    : stats.version;
  $("uptime").textContent = formatDuration(stats.uptime_seconds);
  showOverviewError(stats.errors.join("; "));

  // Rates: what changed since the previous frame, per second.
  const current = { time: now, next: {}, delivered: stats.delivered };
  const rateNow = {};
  for (const info of stats.namespaces) {
    const ns = info.namespace;
    current.next[ns] = info.next_index;
    if (previous && previous.next[ns] !== undefined) {
      const seconds = (now - previous.time) / 1000;
      const published = Math.max(0, info.next_index - previous.next[ns]) / seconds;
      const delivered = Math.max(0, (stats.delivered[ns] || 0) - (previous.delivered[ns] || 0)) / seconds;
      rates.push(`${ns}/publish`, now, published);
      rates.push(`${ns}/delivered`, now, delivered);
      rateNow[ns] = [published, delivered];
    }
  }
  previous = current;

  const names = stats.namespaces.map((info) => info.namespace);
  if (names.join("\n") !== [...cards.keys()].join("\n")) {
    cards.clear();
    for (const ns of names) cards.set(ns, namespaceCard(ns));
    const nodes = [...cards.values()].map(({ card }) => card);
    if (!nodes.length) nodes.push(el("p", { class: "muted", text: "No namespace to show." }));
    $("namespaces").replaceChildren(...nodes);
  }
  for (const info of stats.namespaces) cards.get(info.namespace).update(info, rateNow[info.namespace]);

  for (const [ns, list] of Object.entries(stats.consumers)) {
    for (const c of list) lags.push(`${ns}/${c.name}`, now, c.lag);
  }
  consumers.render(stats.consumers);
  tail.suggestPattern(stats.namespaces);
  publish.suggestSubject(stats.namespaces);
}

function showOverviewError(text) {
  const errors = $("overview-errors");
  errors.hidden = !text;
  errors.textContent = text;
}

const live = {
  source: null,
  retry: null,

  connect() {
    if (this.source) this.source.close();
    clearTimeout(this.retry);
    const source = new EventSource(streamUrl("/console/live"));
    this.source = source;
    source.addEventListener("stats", (e) => renderStats(JSON.parse(e.data)));
    source.addEventListener("error", async (e) => {
      if (e.data) showOverviewError(e.data); // an error frame from the server
      const health = $("health");
      health.dataset.state = "unknown";
      health.textContent = "reconnecting…";
      if (source.readyState !== EventSource.CLOSED) return; // the browser retries by itself
      // Refused (401/403) or answered otherwise: ask why, then try again later.
      const probe = await api("/namespaces").catch(() => null);
      if (probe && (probe.status === 401 || probe.status === 403)) {
        health.textContent = "no access";
        return;
      }
      this.retry = setTimeout(() => this.connect(), 3000);
    });
  },
};

// ---- live tail ---------------------------------------------------------------------

const tail = {
  source: null,
  paused: false,
  waiting: [], // events that came while paused
  count: 0,
  suggested: false,

  suggestPattern(namespaces) {
    const input = $("tail-pattern");
    if (!this.suggested && !input.value && namespaces.length) input.value = `${namespaces[0].namespace}.>`;
    this.suggested = true;
  },

  setup() {
    $("tail-from").addEventListener("change", () => {
      const from = $("tail-from").value;
      $("tail-index-field").hidden = from !== "index";
      $("tail-time-field").hidden = from !== "time";
    });
    $("tail-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.start();
    });
    $("tail-pause").addEventListener("click", () => (this.paused ? this.resume() : this.pause()));
    $("tail-clear").addEventListener("click", () => {
      $("tail-events").replaceChildren();
      this.waiting = [];
      this.count = 0;
      this.status(this.source ? "Cleared; still streaming." : "Cleared.");
    });
    $("tail-filter").addEventListener("input", () => this.applyFilter());
  },

  status(text) {
    $("tail-status").textContent = text;
  },

  params() {
    const params = new URLSearchParams({ subject: $("tail-pattern").value.trim() });
    const from = $("tail-from").value;
    if (from === "oldest") params.set("start", "oldest");
    if (from === "index") {
      const index = $("tail-index").value.trim();
      if (!/^\d+$/.test(index)) throw new Error("Enter a position: a whole number from 0.");
      params.set("start_index", index);
    }
    if (from === "time") {
      const local = $("tail-time").value;
      const time = new Date(local);
      if (!local || Number.isNaN(time.getTime())) throw new Error("Enter a time to start from.");
      params.set("start_time", time.toISOString());
    }
    return params;
  },

  async start() {
    let params;
    try {
      params = this.params();
    } catch (e) {
      this.status(e.message);
      return;
    }
    this.stop();
    const pattern = params.get("subject");
    // Ask first, so that a refusal shows the server's words (EventSource hides them).
    const head = await api(`/?${params}`, { method: "HEAD" }).catch((e) => e);
    if (head instanceof Error) {
      this.status(`Could not reach the server: ${head.message}`);
      return;
    }
    if (!head.ok) {
      // A HEAD answer has no body: the same request as a finite GET gets the words.
      const check = await api(`/?${params}&until=now`).catch(() => null);
      const text = check && !check.ok ? (await check.text()).trim() : "";
      if (check && check.ok) await check.body?.cancel();
      this.status(`The server refused the stream (${head.status})${text ? `: ${text}` : "."}`);
      return;
    }
    const source = new EventSource(streamUrl("/", params));
    this.source = source;
    this.paused = false;
    $("tail-pause").disabled = false;
    $("tail-pause").textContent = "Pause";
    this.status(`Connecting to ${pattern}…`);
    source.addEventListener("open", () => this.status(`Streaming ${pattern}.`));
    source.addEventListener("msg", (e) => this.receive(JSON.parse(e.data)));
    source.addEventListener("skipped", (e) => {
      const range = JSON.parse(e.data);
      this.status(`Retention removed positions ${range.first_index}…${range.last_index} before they could be read.`);
    });
    source.addEventListener("error", (e) => {
      if (e.data) {
        this.status(`The stream ended: ${e.data}`);
        this.stop();
      } else if (source.readyState === EventSource.CLOSED) {
        this.status("The stream was refused or closed.");
        this.stop();
      } else {
        this.status(`Reconnecting to ${pattern}…`);
      }
    });
  },

  stop() {
    if (this.source) this.source.close();
    this.source = null;
    $("tail-pause").disabled = true;
  },

  pause() {
    this.paused = true;
    $("tail-pause").textContent = "Resume";
    this.status("Paused: new events wait until you resume.");
  },

  resume() {
    this.paused = false;
    $("tail-pause").textContent = "Pause";
    const waiting = this.waiting;
    this.waiting = [];
    waiting.forEach((event) => this.show(event));
    this.status(this.source ? "Streaming." : "Not streaming.");
  },

  receive(event) {
    if (this.paused) {
      this.waiting.push(event);
      if (this.waiting.length > MAX_ROWS) this.waiting.shift();
      this.status(`Paused: ${this.waiting.length} new event(s) waiting.`);
      return;
    }
    this.show(event);
  },

  show(event) {
    const list = $("tail-events");
    const pretty = event.payload === undefined ? "(no payload)" : JSON.stringify(event.payload, null, 2);
    const compact = event.payload === undefined ? "(no payload)" : JSON.stringify(event.payload);
    const summary = compact.length > 80 ? `${compact.slice(0, 80)}…` : compact;
    const meta = el("div", { class: "meta" },
      el("span", { class: "subject", text: event.subject }),
      el("span", { class: "id", text: event.id }),
      el("span", { class: "index", text: `#${event.index}` }),
      el("time", { datetime: event.created_at, title: event.created_at, text: formatTime(event.created_at) }));
    if (event.key) meta.append(el("span", { class: "tag", text: `key ${event.key}` }));
    if (event.trace_id) meta.append(el("span", { class: "tag", text: `trace ${event.trace_id}` }));
    const details = el("details", {}, el("summary", { text: summary }), el("pre", { text: pretty }));
    const item = el("li", { class: "event", "data-id": event.id }, meta, details);
    item.dataset.search = `${event.subject} ${event.id} ${compact}`.toLowerCase();
    item.hidden = !this.matches(item);
    list.prepend(item);
    while (list.children.length > MAX_ROWS) list.lastElementChild.remove();
    this.count += 1;
    if (!this.paused && this.source) this.status(`Streaming: ${this.count} event(s) received.`);
  },

  matches(item) {
    const filter = $("tail-filter").value.trim().toLowerCase();
    return !filter || item.dataset.search.includes(filter);
  },

  applyFilter() {
    for (const item of $("tail-events").children) item.hidden = !this.matches(item);
  },
};

// ---- publish -----------------------------------------------------------------------

const publish = {
  suggested: false,

  suggestSubject(namespaces) {
    const input = $("pub-subject");
    if (!this.suggested && !input.value && namespaces.length) input.placeholder = `${namespaces[0].namespace}.example`;
    this.suggested = true;
  },

  setup() {
    $("publish-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    $("pub-payload").addEventListener("input", () => this.payloadError(""));
  },

  payloadError(message) {
    const error = $("pub-payload-error");
    error.hidden = !message;
    error.textContent = message;
    $("pub-payload").setAttribute("aria-invalid", String(Boolean(message)));
  },

  result(kind, text) {
    const out = $("pub-result");
    out.dataset.kind = kind;
    out.textContent = text;
  },

  async send() {
    const subject = $("pub-subject").value.trim();
    if (!subject) {
      this.result("error", "A subject is needed, e.g. orders.created.");
      $("pub-subject").focus();
      return;
    }
    const event = { subject };
    const text = $("pub-payload").value;
    if (text.trim()) {
      try {
        event.payload = JSON.parse(text);
      } catch (e) {
        // Nothing is sent: the parser's own words say where the JSON breaks.
        this.payloadError(`Not valid JSON, nothing was sent: ${e.message}`);
        this.result("error", "");
        $("pub-payload").focus();
        return;
      }
    }
    this.payloadError("");
    const key = $("pub-key").value.trim();
    const trace = $("pub-trace").value.trim();
    if (key) event.key = key;
    if (trace) event.trace_id = trace;
    $("pub-send").disabled = true;
    this.result("pending", "Publishing…");
    try {
      const response = await api("/", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(event),
      });
      if (response.status === 202) {
        const h = (name) => response.headers.get(name) || "–";
        this.result("ok", `Stored: id ${h("X-BUS-EVENT-ID")}, index ${h("X-BUS-EVENT-INDEX")}, created at ${h("X-BUS-EVENT-CREATED-AT")}`);
      } else {
        this.result("error", `Refused (${response.status}): ${(await response.text()).trim()}`);
      }
    } catch (e) {
      this.result("error", `Could not reach the server: ${e.message}`);
    } finally {
      $("pub-send").disabled = false;
    }
  },
};

// ---- consumers ---------------------------------------------------------------------

const CONSUMER_FIELDS = [
  ["Pattern", "pattern"],
  ["Acked floor", "acked_floor"],
  ["Pending", "pending"],
  ["Lag", "lag"],
  ["Members", "members"],
];

const consumers = {
  latest: {},
  rows: new Map(), // "namespace/name" → { update }
  shape: "", // the namespaces and consumer names the list was built for

  // Rebuilds the list when consumers came or went, else updates its figures in place (a
  // focused Delete button keeps its focus).
  render(byNamespace) {
    this.latest = byNamespace;
    const shape = JSON.stringify(Object.entries(byNamespace).map(([ns, list]) => [ns, list.map((c) => c.name)]));
    if (shape !== this.shape) this.build(byNamespace, shape);
    for (const [ns, list] of Object.entries(byNamespace)) {
      for (const c of list) this.rows.get(`${ns}/${c.name}`)?.update(c);
    }
  },

  build(byNamespace, shape) {
    this.shape = shape;
    this.rows.clear();
    const blocks = [];
    for (const [ns, list] of Object.entries(byNamespace)) {
      const heading = el("h3", { text: ns });
      if (!list.length) {
        blocks.push(el("section", { class: "panel", "data-namespace": ns }, heading, el("p", { class: "muted", text: "No durable consumer." })));
        continue;
      }
      const rows = list.map((c) => this.row(ns, c.name));
      const head = el("tr", {}, ...["Name", ...CONSUMER_FIELDS.map(([label]) => label), "Lag, 5 min", "Actions"]
        .map((label) => el("th", { scope: "col", text: label })));
      const table = el("table", { class: "consumers" },
        el("caption", { class: "visually-hidden", text: `Durable consumers of ${ns}` }),
        el("thead", {}, head), el("tbody", {}, ...rows));
      blocks.push(el("section", { class: "panel", "data-namespace": ns }, heading, table));
    }
    if (!blocks.length) blocks.push(el("p", { class: "muted", text: "No namespace to show." }));
    $("consumer-list").replaceChildren(...blocks);
  },

  row(ns, name) {
    const cells = CONSUMER_FIELDS.map(([label]) => el("td", { "data-label": label }));
    const canvas = el("canvas", { class: "spark", role: "img", "aria-label": `Lag of ${name} over the last 5 minutes` });
    const remove = el("button", { type: "button", class: "danger", "aria-label": `Delete consumer ${name} of ${ns}`, text: "Delete" });
    remove.addEventListener("click", () => this.remove(ns, name));
    this.rows.set(`${ns}/${name}`, {
      update: (c) => {
        CONSUMER_FIELDS.forEach(([, key], i) => (cells[i].textContent = String(c[key])));
        drawSparkline(canvas, lags.get(`${ns}/${name}`));
      },
    });
    return el("tr", { "data-consumer": `${ns}/${name}` },
      el("th", { scope: "row", "data-label": "Name", text: name }),
      ...cells,
      el("td", { "data-label": "Lag, 5 min", class: "chart-cell" }, canvas),
      el("td", {}, remove));
  },

  async remove(ns, name) {
    const sure = window.confirm(`Delete the durable consumer "${name}" of ${ns}?\n\nIts progress is forgotten and its members' streams end.`);
    if (!sure) {
      this.message(`Kept ${name}.`);
      return;
    }
    const response = await api(`/consumers/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`, { method: "DELETE" })
      .catch((e) => e);
    if (response instanceof Error) {
      this.message(`Could not reach the server: ${response.message}`);
      return;
    }
    if (response.status !== 204) {
      this.message(`Deleting ${name} failed (${response.status}): ${(await response.text()).trim()}`);
      return;
    }
    this.message(`Deleted ${name} of ${ns}.`);
    await this.refresh(ns);
  },

  // Reads one namespace's consumers again at once (the live figures follow within 2 s).
  async refresh(ns) {
    const response = await api(`/consumers/${encodeURIComponent(ns)}`).catch(() => null);
    if (!response || !response.ok) return;
    this.render({ ...this.latest, [ns]: await response.json() });
  },

  refreshAll() {
    return Promise.all(Object.keys(this.latest).map((ns) => this.refresh(ns)));
  },

  message(text) {
    $("consumers-message").textContent = text;
  },
};

// ---- start -------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setupAuth();
  setupTabs();
  tail.setup();
  publish.setup();
  live.connect();
  window.addEventListener("resize", redrawCharts);
  // Dark and light mode draw with different colours.
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", redrawCharts);
});
