// Triage dashboard: polls ui/api/summary and redraws in place (no reload, no library).
// Numbers come straight from the JSON; each shown number keeps its exact value in data-value.
"use strict";

const TOKEN_KEY = "triage-ui-token";
const SVG = "http://www.w3.org/2000/svg";
const params = new URLSearchParams(location.search);
// Between 0.25 s and an hour: a longer delay overflows setInterval, which then fires at once.
const EVERY_S = Math.min(3600, Math.max(0.25, Number(params.get("every")) || 2));
const PAGE = 100;

let offset = 0;
let polls = 0;
let timer = null;
let inFlight = false;
const history = [];

const $ = (id) => document.getElementById(id);

function usd(x) {
  if (x === null || x === undefined) return "–";
  const a = Math.abs(x);
  return "$" + x.toFixed(a >= 100 ? 2 : a >= 1 ? 4 : 6);
}
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
const secs = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
const count = (x) => (x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en-US"));

function show(id, value, format) {
  const el = $(id);
  el.textContent = format(value);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function fillRows(tbody, rows) {
  const frag = document.createDocumentFragment();
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.appendChild(cell);
    frag.appendChild(tr);
  }
  tbody.replaceChildren(frag);
}

function cell(text, cls, value) {
  const td = el("td", text, cls);
  if (value !== undefined && value !== null) td.dataset.value = String(value);
  return td;
}

function bars(container, counts, attr) {
  const entries = Object.entries(counts).filter(([, n]) => n > 0);
  if (!entries.length) {
    container.replaceChildren(el("div", "none", "empty"));
    return;
  }
  const top = Math.max(...entries.map(([, n]) => n));
  const frag = document.createDocumentFragment();
  for (const [name, n] of entries) {
    const row = el("div", null, "row");
    row.dataset[attr] = name;
    row.dataset.value = String(n);
    const fill = el("div", null, "fill");
    fill.style.width = (100 * n) / top + "%";
    const track = el("div");
    track.appendChild(fill);
    row.append(el("span", name), track, el("span", count(n), "n"));
    frag.appendChild(row);
  }
  container.replaceChildren(frag);
}

function drawShare(share) {
  const bar = $("share-bar");
  const parts = [svg("rect", { x: 0, y: 2, width: 300, height: 10, fill: "#e3e6eb" })];
  if (share.students !== null) {
    parts.push(svg("rect", { x: 0, y: 2, width: 300 * share.students, height: 10, fill: "#2f7de1" }));
  }
  if (share.target !== null) {
    parts.push(svg("rect", { x: 300 * share.target - 1, y: 0, width: 2, height: 14, fill: "#1d2330" }));
  }
  bar.replaceChildren(...parts);
}

function drawSpend(spend) {
  const top = Math.max(spend.actual_usd, spend.teacher_only_usd) || 1;
  $("spend-bar").replaceChildren(
    svg("rect", { x: 0, y: 2, width: (300 * spend.actual_usd) / top, height: 11, fill: "#2f7de1" }),
    svg("rect", { x: 0, y: 17, width: (300 * spend.teacher_only_usd) / top, height: 11, fill: "#e0873a" }),
  );
}

function drawHistory(doc) {
  history.push({ t: doc.generated_at, v: doc.spend.savings_ratio });
  if (history.length > 300) history.shift();
  const box = $("history");
  const W = 400, H = 120, L = 34, B = 16;
  const parts = [];
  for (const y of [0, 0.5, 1]) {
    const py = H - B - y * (H - B - 6);
    parts.push(svg("line", { x1: L, x2: W, y1: py, y2: py, stroke: "#e3e6eb" }));
    const label = svg("text", { x: 2, y: py + 4, "font-size": 10, fill: "#6b7280" });
    label.textContent = y * 100 + "%";
    parts.push(label);
  }
  const pts = history.filter((p) => p.v !== null);
  if (pts.length) {
    const t0 = pts[0].t, t1 = Math.max(pts[pts.length - 1].t, t0 + 1);
    const xy = pts.map((p) => {
      const x = L + ((p.t - t0) / (t1 - t0)) * (W - L - 4);
      const y = H - B - Math.max(0, Math.min(1, p.v)) * (H - B - 6);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    parts.push(svg("polyline", { points: xy.join(" "), fill: "none", stroke: "#1f9d55", "stroke-width": 2 }));
  }
  box.replaceChildren(...parts);
}

function drawScores(scores) {
  const box = $("scores");
  const W = 400, H = 150, L = 6, B = 18, T = 24;
  const top = Math.max(1, ...scores.buckets.map((b) => b.count));
  const parts = [];
  let lower = 0;
  for (const b of scores.buckets) {
    const x = L + lower * (W - 2 * L);
    const w = (b.le - lower) * (W - 2 * L);
    const h = (b.count / top) * (H - B - T);
    const rect = svg("rect", { x: x + 0.5, y: H - B - h, width: Math.max(0, w - 1), height: h, fill: "#9db8dc" });
    rect.dataset.le = String(b.le);
    rect.dataset.value = String(b.count);
    const tip = svg("title", {});
    tip.textContent = `${lower.toFixed(2)}–${b.le.toFixed(2)}: ${b.count}`;
    rect.appendChild(tip);
    parts.push(rect);
    lower = b.le;
  }
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    const t = svg("text", { x: L + tick * (W - 2 * L), y: H - 4, "font-size": 10, fill: "#6b7280", "text-anchor": "middle" });
    t.textContent = String(tick);
    parts.push(t);
  }
  let i = 0;
  for (const [model, value] of Object.entries(scores.thresholds)) {
    if (value === null) continue;
    const x = L + Math.min(1, value) * (W - 2 * L);
    const line = svg("line", { x1: x, x2: x, y1: 11 * i, y2: H - B, stroke: "#d64545", "stroke-width": 1.5, "stroke-dasharray": "4 3" });
    line.dataset.model = model;
    line.dataset.value = String(value);
    const label = svg("text", { x: x + 3, y: 9 + 11 * i, "font-size": 10, fill: "#d64545" });
    label.textContent = `${model} < ${value.toFixed(3)}`;
    parts.push(line, label);
    i += 1;
  }
  box.replaceChildren(...parts);
}

function render(doc) {
  $("build").textContent = doc.version ? `version ${doc.version} · config ${doc.config_hash}` : "";
  show("requests", doc.requests, count);
  show("rejected", doc.rejected, count);
  show("share", doc.share.students, pct);
  show("target", doc.share.target, pct);
  show("window", doc.share.window, pct);
  show("spend", doc.spend.actual_usd, usd);
  show("teacher-spend", doc.spend.teacher_only_usd, usd);
  show("savings", doc.spend.savings_usd, usd);
  show("savings-pct", doc.spend.savings_ratio, pct);
  show("shadow-spend", doc.spend.shadow_usd, usd);
  show("fallbacks-total", doc.fallbacks.total, count);
  show("overhead-p50", doc.overhead.p50_s === null ? null : doc.overhead.p50_s * 1000, (x) => (x === null ? "–" : x.toFixed(2) + " ms"));
  show("overhead-p99", doc.overhead.p99_s === null ? null : doc.overhead.p99_s * 1000, (x) => (x === null ? "–" : x.toFixed(2) + " ms"));
  drawShare(doc.share);
  drawSpend(doc.spend);
  drawHistory(doc);
  drawScores(doc.scores);
  bars($("fallbacks-reason"), doc.fallbacks.by_reason, "reason");
  bars($("fallbacks-model"), doc.fallbacks.by_model, "model");

  fillRows($("latency").tBodies[0], doc.models.map((m) => [
    cell(m.name + (m.name === doc.teacher ? " (teacher)" : "")),
    cell(count(m.requests), "num", m.requests),
    cell(secs(m.latency_p50_s), "num", m.latency_p50_s),
    cell(secs(m.latency_p95_s), "num", m.latency_p95_s),
    cell(secs(m.ttft_p50_s), "num", m.ttft_p50_s),
    cell(secs(m.ttft_p95_s), "num", m.ttft_p95_s),
    cell(usd(m.cost_usd), "num", m.cost_usd),
  ]));
  fillRows($("keys").tBodies[0], doc.keys.length
    ? doc.keys.map((k) => [cell(k.key), cell(usd(k.spend_usd), "num", k.spend_usd), cell(count(k.rate_limited), "num", k.rate_limited)])
    : [[cell("no client keys configured", "empty")]]);
  fillRows($("circuits").tBodies[0], doc.circuits.map((c) => [
    cell(c.model), cell(c.endpoint), cell(c.state.replace("_", "-"), "state-" + c.state, c.state),
  ]));

  const d = doc.decisions;
  const last = Math.min(d.offset + d.rows.length, d.total);
  $("decisions-info").textContent = d.total
    ? `${d.offset + 1}–${last} of ${d.total.toLocaleString("en-US")} (${d.source})`
    : `none yet (${d.source})`;
  $("decisions-info").dataset.total = String(d.total);
  $("newer").disabled = d.offset === 0;
  $("older").disabled = last >= d.total;
  fillRows($("decisions").tBodies[0], d.rows.map((r) => {
    const tr = [
      cell(new Date(r.ts * 1000).toLocaleTimeString("en-GB"), null, r.ts),
      cell(r.request_id, "id"),
      cell(r.key ?? "–"),
      cell(r.model ?? "–"),
      cell(r.reason),
      cell(r.score === null ? "–" : r.score.toFixed(3), "num", r.score),
      cell(count(r.prompt_tokens + r.completion_tokens), "num", r.prompt_tokens + r.completion_tokens),
      cell(usd(r.cost_usd), "num", r.cost_usd),
      cell(r.fallback ?? "–"),
      cell(String(r.status), "num", r.status),
      cell(Math.round(r.latency_ms) + " ms", "num", r.latency_ms),
    ];
    tr[1].title = r.request_id;
    return tr;
  }));
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function setStatus(text, cls) {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + (cls || "");
}

async function poll() {
  if (inFlight) return;
  inFlight = true;
  try {
    const headers = {};
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const resp = await fetch(`ui/api/summary?offset=${offset}&limit=${PAGE}`, { headers, cache: "no-store" });
    if (resp.status === 401) {
      stop();
      $("board").hidden = true;
      $("login").hidden = false;
      $("login-error").textContent = t ? "That token was refused." : "";
      setStatus("token needed", "down");
      return;
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const doc = await resp.json();
    render(doc);
    $("login").hidden = true;
    $("board").hidden = false;
    polls += 1;
    document.body.dataset.polls = String(polls);
    if (polls === 1) performance.mark("triage-first-render");
    setStatus("live · " + new Date(doc.generated_at * 1000).toLocaleTimeString("en-GB"), "live");
  } catch (err) {
    setStatus("unreachable: " + err.message, "down");
  } finally {
    inFlight = false;
  }
}

function start() {
  stop();
  poll();
  timer = setInterval(poll, EVERY_S * 1000);
}

function stop() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

document.addEventListener("DOMContentLoaded", () => {
  $("every").textContent = String(EVERY_S);
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const given = $("token").value.trim();
    // A header carries printable ASCII only: fetch would throw on anything else, on every poll.
    if (!/^[\x21-\x7e]+$/.test(given)) {
      $("login-error").textContent = "A token is printable ASCII, without spaces.";
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, given);
    $("token").value = "";
    start();
  });
  $("newer").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); poll(); });
  $("older").addEventListener("click", () => { offset += PAGE; poll(); });
  start();
});
