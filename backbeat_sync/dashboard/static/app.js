// backbeat-sync dashboard: one server-sent event stream of snapshots, rendered with DOM text nodes.
// Nothing an agent sends is ever parsed as HTML: every value goes through textContent.
"use strict";

const LIMIT = 100; // rows of agents and of operations; the server sends totals and at most this many
const FINISHED = 30; // rows of recently finished operations

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells, className) {
  const tr = el("tr", null, className);
  for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

function td(child, className) {
  const cell = el("td", null, className);
  cell.append(child);
  return cell;
}

// a yes/no cell, green when it is the healthy answer, red when not
function flag(value, healthy) {
  return el("td", value ? "yes" : "no", value === healthy ? "good" : "bad");
}

function fmt(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function renderBeat(c) {
  document.getElementById("cluster-id").textContent = c.cluster_id;
  if (c.beat_index === null) return;
  document.getElementById("beat-index").textContent = c.beat_index;
  document.getElementById("beat-bar").textContent = c.bar;
  document.getElementById("beat-tempo").textContent = `${c.tempo_bpm} BPM`;
  document.getElementById("beat-measured").textContent = `${fmt(c.measured_bpm)} BPM`;
  const drift = document.getElementById("beat-drift");
  drift.textContent = c.drift;
  drift.className = `drift-${c.drift}`;
  const dots = [];
  for (let i = 1; i <= Math.min(c.bar_length, 16); i++) dots.push(el("span", null, i === c.beat_in_bar ? "dot on" : "dot"));
  document.getElementById("beat-dots").replaceChildren(...dots);
}

// the row under a table that says how many rows the server left out
function more(shown, matching, total, columns) {
  if (shown === total) return [];
  const all = matching === total ? "" : ` (${total} in all)`;
  const hint = shown < matching ? ": type in the filter to narrow" : "";
  const cell = el("td", `showing ${shown} of ${matching} matching${all}${hint}`);
  cell.colSpan = columns;
  return [row([cell], "more")];
}

function renderAgents(a) {
  document.getElementById("agents-summary").textContent =
    `${a.total} agents, ${a.connected} connected, ${a.degraded} degraded`;
  const rows = a.rows.map((g) => {
    const tr = row([g.agent_id, g.node_id, g.health ?? "–", flag(g.connected, true), flag(g.degraded, false),
      g.active, g.last_beat, el("td", g.notes, "notes")], g.degraded ? "agent-row degraded" : "agent-row");
    tr.dataset.agent = g.agent_id;
    return tr;
  });
  document.querySelector("#agents tbody").replaceChildren(...rows, ...more(a.rows.length, a.matching, a.total, 8));
}

function progressBar(o) {
  const bar = el("div", null, o.warned ? "progress warned" : "progress");
  const fill = el("div", null, "fill");
  fill.style.width = `${Math.min(100, Math.round(o.progress * 100))}%`;
  bar.append(fill);
  bar.dataset.progress = o.progress;
  bar.title = `${Math.round(o.progress * 100)}% of the budget used`;
  return bar;
}

function renderOperations(ops) {
  document.getElementById("ops-summary").textContent = `${ops.total} active, ${ops.warned} past a warning`;
  const rows = ops.rows.map((o) => {
    const tr = row([o.agent_id, o.task_id, o.operation_type, o.phase, td(progressBar(o)),
      `${fmt(o.beats_used)} / ${fmt(o.budget)}`, el("td", o.notes, "notes")], "op-row");
    tr.dataset.task = o.task_id;
    return tr;
  });
  document.querySelector("#operations tbody").replaceChildren(...rows, ...more(ops.rows.length, ops.matching, ops.total, 7));
}

function renderFinished(f) {
  document.getElementById("finished-summary").textContent = `${f.total} finished since the page's server started`;
  const rows = f.rows.map((o) => {
    const tr = row([o.agent_id, o.task_id, o.operation_type, el("td", o.outcome, `outcome-${o.outcome}`),
      `${fmt(o.beats_used)} / ${fmt(o.budget)}`, o.finished_beat, el("td", o.notes, "notes")], "finished-row");
    tr.dataset.task = o.task_id;
    return tr;
  });
  document.querySelector("#finished tbody").replaceChildren(...rows);
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function renderChart(types) {
  const chart = document.getElementById("chart");
  const shown = types.slice(0, 20);
  const rowH = 22, left = 130, width = 560;
  const scale = Math.max(1, ...shown.map((t) => Math.max(t.mean_budget ?? 0, t.max_used ?? 0)));
  const nodes = [];
  shown.forEach((t, i) => {
    const y = i * rowH + 4;
    nodes.push(svg("text", { x: 0, y: y + 13 }, `${t.operation_type || "(none)"} (${t.finished})`));
    const w = (v) => Math.max(0, ((v ?? 0) / scale) * (width - left - 60));
    nodes.push(svg("rect", { x: left, y, width: w(t.mean_budget), height: 16, class: "budget" }));
    nodes.push(svg("rect", { x: left, y: y + 4, width: w(t.mean_used), height: 8, class: "used" }));
    nodes.push(svg("rect", { x: left + w(t.max_used) - 1, y, width: 2, height: 16, class: "max" }));
    nodes.push(svg("text", { x: left + w(Math.max(t.mean_budget ?? 0, t.max_used ?? 0)) + 6, y: y + 13 },
      `${fmt(t.mean_used)} / ${fmt(t.mean_budget)}`));
  });
  chart.setAttribute("viewBox", `0 0 ${width} ${Math.max(1, shown.length) * rowH + 8}`);
  chart.setAttribute("height", Math.max(1, shown.length) * rowH + 8);
  chart.replaceChildren(...nodes);
}

function render(snap) {
  renderBeat(snap.cluster);
  renderAgents(snap.agents);
  renderOperations(snap.operations);
  renderFinished(snap.finished);
  renderChart(snap.types);
  document.getElementById("footer").textContent =
    `${snap.messages} messages, ${snap.invalid_messages} rejected; subscriber ${snap.source_connected ? "connected" : "disconnected"}`;
}

let source = null;

function connect() {
  if (source) source.close();
  const filter = document.getElementById("filter").value;
  const badge = document.getElementById("stream-state");
  source = new EventSource(`/events?limit=${LIMIT}&finished=${FINISHED}&filter=${encodeURIComponent(filter)}`);
  source.addEventListener("snapshot", (event) => {
    badge.textContent = "live";
    badge.className = "badge live";
    render(JSON.parse(event.data));
  });
  source.addEventListener("error", () => {
    badge.textContent = "reconnecting";
    badge.className = "badge down";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  let timer = null;
  document.getElementById("filter").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(connect, 300);
  });
  connect();
});
