// The iota dashboard: polls /v1/dashboard and redraws. Plain DOM and hand-drawn SVG charts, no library.
// Every piece of data reaches the page as text (textContent), never as markup: names are contributors' own.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
let runId = new URLSearchParams(location.search).get("run") || "";
let lastOk = 0;
let timer = null;
let inflight = false;

// --- small helpers ---------------------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

function si(x) {
  if (x == null || !isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a >= 1e9) return (x / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (x / 1e6).toFixed(1) + "M";
  if (a >= 1e3) return (x / 1e3).toFixed(1) + "k";
  return Number.isInteger(x) ? String(x) : x.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 2);
}

function duration(s) {
  if (s == null) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function fixed(x, digits) {
  return x == null || !isFinite(x) ? "–" : Number(x).toFixed(digits);
}

function badge(text, kind) {
  return el("span", { class: "badge " + (kind || text) }, text);
}

function fillTable(id, rows, empty) {
  const body = document.querySelector("#" + id + " tbody");
  const cols = document.querySelectorAll("#" + id + " thead th").length;
  const fresh = rows.length ? rows : [el("tr", { class: "empty-row" }, el("td", { colspan: cols }, empty))];
  body.replaceChildren(...fresh);
}

function row(...cells) {
  return el("tr", {}, ...cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))));
}

function num(value) {
  return el("td", { class: "num" }, value);
}

// --- charts ------------------------------------------------------------------------------------------

// Round steps (1, 2, 5 x 10^k) giving about `count` ticks over [lo, hi].
function ticks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
  return out;
}

// Draw lines and dots on an SVG of viewBox 640x260. series: [{points: [[x, y]], cls, dots}].
function chart(node, series, opts) {
  const W = 640, H = 260, L = 52, R = 14, T = 12, B = 34;
  const all = series.flatMap((s) => s.points);
  node.replaceChildren();
  node.dataset.points = String(all.length);
  if (!all.length) {
    node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, opts.empty));
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (opts.zeroY) y0 = Math.min(0, y0);
  if (opts.zeroX) x0 = Math.min(0, x0);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= opts.zeroY ? 0 : Math.abs(y0) * 0.05 || 1; }
  const pad = (y1 - y0) * 0.06;
  y1 += pad; if (!opts.zeroY) y0 -= pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of ticks(y0, y1, 5)) {
    node.append(svg("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "grid" }));
    node.append(svg("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end", class: "axis" }, opts.yFormat(t)));
  }
  for (const t of ticks(x0, x1, 6)) {
    node.append(svg("text", { x: X(t), y: H - B + 16, "text-anchor": "middle", class: "axis" }, opts.xFormat(t)));
  }
  node.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "axis" }, opts.xLabel));
  for (const s of series) {
    if (!s.points.length) continue;
    if (s.dots) {
      for (const p of s.points) {
        const dot = svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 4, class: s.cls + (p[2] === false ? " failed" : "") });
        dot.append(svg("title", {}, s.title(p)));
        node.append(dot);
      }
      continue;
    }
    const d = s.points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join("");
    if (s.area) {
      const last = s.points[s.points.length - 1], first = s.points[0];
      const area = d + "L" + X(last[0]).toFixed(1) + "," + Y(y0) + "L" + X(first[0]).toFixed(1) + "," + Y(y0) + "Z";
      node.append(svg("path", { d: area, class: s.cls + "-area" }));
    }
    node.append(svg("path", { d, class: s.cls }));
  }
}

// --- the sections ------------------------------------------------------------------------------------

function cards(doc) {
  const r = doc.run, rounds = doc.rounds.counts, checks = doc.checks.counts;
  const card = (label, value, sub) =>
    el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value),
      el("div", { class: "sub" }, sub || ""));
  const samples = r.max_samples ? `${si(r.samples_completed)} / ${si(r.max_samples)}` : si(r.samples_completed);
  const alive = doc.contributors.filter((c) => c.state !== "gone" && c.state !== "banned").length;
  document.getElementById("cards").replaceChildren(
    card("tokens", si(r.tokens), `${si(r.tokens_per_sample)} per sample`),
    card("tokens / s", si(r.tokens_per_s), "last 30 s"),
    card("loss", fixed(r.last_loss, 3), r.first_loss != null ? `from ${fixed(r.first_loss, 3)}${r.loss_vetted ? ", vetted" : ""}` : ""),
    card("samples", samples, `${r.chains_in_flight} in flight, ${si(r.samples_dropped)} dropped`),
    card("contributors", `${alive} / ${doc.contributors.length}`, "training / all"),
    card("merge rounds", si(rounds.closed || 0), `closed; ${(rounds.open || 0) + (rounds.reducing || 0)} in progress`),
    card("checks", `${checks.passed || 0} / ${checks.failed || 0}`, "passed / failed"),
    card("elapsed", duration(r.elapsed_s), r.state),
  );
}

function charts(doc) {
  const s = doc.series;
  chart(document.getElementById("loss-chart"), [
    { points: s.loss, cls: "train" },
    {
      points: s.heldout.map((h) => [h.tokens, h.loss, h.passed]), cls: "heldout", dots: true,
      title: (p) => `held-out loss ${p[1].toFixed(3)} at ${si(p[0])} tokens${p[2] ? "" : " (update refused)"}`,
    },
  ], { xFormat: si, yFormat: (v) => v.toFixed(2), xLabel: "tokens", empty: "no loss reported yet", zeroX: true });
  chart(document.getElementById("rate-chart"), [{ points: s.tokens_per_s, cls: "rate", area: true }],
    { xFormat: (v) => duration(v), yFormat: si, xLabel: "since the run began", empty: "no tokens yet", zeroY: true, zeroX: true });
}

function stages(doc) {
  const byStage = {};
  for (const c of doc.contributors) (byStage[c.stage] = byStage[c.stage] || []).push(c);
  fillTable("stages", doc.stages.map((s) => {
    const ws = byStage[s.stage] || [];
    const alive = ws.filter((c) => c.state !== "gone" && c.state !== "banned").length;
    return row(s.stage, s.kind, num(s.epoch), num(`${alive} / ${ws.length}`), num(s.queue_forward), num(s.queue_backward),
      num(si(s.forward_done)), num(si(s.backward_done)), num(s.optimizer_steps), el("td", {}, s.weights_ok ? badge("ok") : badge("quarantined", "failed")));
  }), "no stages");
}

function contributors(doc) {
  fillTable("contributors", doc.contributors.map((c) =>
    row(c.name, num(c.stage), c.backend, el("td", {}, badge(c.state)), el("td", { class: "why" }, c.why), num(c.steps),
      num(si(c.tokens_per_s)), num(fixed(c.credits, 2)), num(c.standing), num(`${c.checks.passed} ✓ ${c.checks.failed} ✗`))
  ), "no contributor has joined yet");
}

function rounds(doc) {
  const c = doc.rounds.counts;
  document.getElementById("round-counts").textContent = Object.entries(c).map(([k, v]) => `${v} ${k}`).join(", ");
  fillTable("rounds", doc.rounds.recent.map((r) =>
    row(num(r.stage), num(r.epoch), el("td", {}, badge(r.state)), num(r.contributions), num(duration(r.opened_s)), num(r.took_s == null ? "–" : duration(r.took_s)))
  ), "no merge round yet");
}

function checks(doc) {
  const parts = Object.entries(doc.checks.by_kind).map(([kind, states]) =>
    `${kind}: ${states.passed || 0} passed, ${states.failed || 0} failed`);
  document.getElementById("check-counts").textContent = parts.join("; ");
  fillTable("checks", doc.checks.recent.map((c) =>
    row(num(c.id), c.kind, num(c.stage), c.name, el("td", {}, badge(c.passed ? "passed" : "failed")), num(fixed(c.loss, 3)), num(duration(c.decided_s)))
  ), "no verdict yet");
}

function leaderboard(doc) {
  const top = Math.max(1e-9, ...doc.leaderboard.map((c) => c.total));
  fillTable("leaderboard", doc.leaderboard.map((c) => {
    const bar = el("div", { class: "bar" });
    bar.style.width = Math.max(1, (100 * c.total) / top) + "%";
    return row(num(c.rank), el("td", {}, c.name, bar), num(fixed(c.total, 2)));
  }), "no credits yet");
}

function picker(doc) {
  const select = document.getElementById("run-picker");
  const want = doc.run ? doc.run.run_id : "";
  const options = doc.runs.map((r) => el("option", { value: r.run_id }, `${r.name} (${r.run_id}, ${r.state})`));
  if (select.options.length !== options.length || select.value !== want) {
    select.replaceChildren(...options);
    select.value = want;
  }
}

function render(doc) {
  picker(doc);
  if (!doc.run) {
    document.getElementById("run-title").textContent = "no run yet: an operator creates one with `iota orchestrator run create`";
    return;
  }
  const r = doc.run;
  document.getElementById("run-title").textContent = `${r.name} · ${r.run_id} · ${r.state} · ${r.n_stages} stages`;
  document.title = `${r.name} · iota swarm`;
  cards(doc);
  charts(doc);
  stages(doc);
  contributors(doc);
  rounds(doc);
  checks(doc);
  leaderboard(doc);
}

// --- polling -----------------------------------------------------------------------------------------

async function poll() {
  const live = document.getElementById("live");
  clearTimeout(timer);
  inflight = true;
  try {
    const reply = await fetch("/v1/dashboard" + (runId ? "?run_id=" + encodeURIComponent(runId) : ""), { cache: "no-store" });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    render(await reply.json());
    lastOk = Date.now();
    live.className = "live ok";
    live.textContent = "live · " + new Date(lastOk).toLocaleTimeString();
  } catch (e) {
    live.className = "live down";
    live.textContent = `orchestrator unreachable (${e.message}); retrying` + (lastOk ? ` · last update ${new Date(lastOk).toLocaleTimeString()}` : "");
  } finally {
    inflight = false;
    timer = setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("run-picker").addEventListener("change", (e) => {
    runId = e.target.value;
    history.replaceState(null, "", "?run=" + encodeURIComponent(runId));
    if (!inflight) poll(); // else the poll in flight schedules the next, which asks for the new run
  });
  poll();
});
