// adamd dashboard: polls the JSON API (/v1/models, .../history?since=, .../params) and redraws.
// History is fetched incrementally (only steps newer than the last seen version) and kept here.
"use strict";

const POLL_MS = 1000;
const PARAMS_EVERY = 2; // polls between parameter-table refreshes (norms cost a pass over state)
const KEEP = 4096; // history points kept per chart, like the server
const PALETTE = ["#2563eb", "#f97316", "#10b981", "#a855f7", "#ef4444", "#0ea5e9", "#eab308", "#64748b"];

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const state = { models: [], selected: null, history: [], lastVersion: -1, polls: 0, charts: {}, updated: 0 };

// A token for servers with access control: open the dashboard as /#token=<token> (a fragment
// never reaches the server's logs); kept for this tab only, and taken out of the address bar.
const TOKEN = (() => {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("adamd-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("adamd-token");
})();

async function getJSON(path) {
  const headers = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};
  const r = await fetch(path, { cache: "no-store", headers });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw Object.assign(new Error(body.message || r.statusText), { status: r.status });
  }
  return r.json();
}

function makeCharts() {
  const defs = {
    loss: { title: "Loss", hint: "mean of the losses workers report with their pushes" },
    grad: { title: "Gradient and update norm", hint: "L2 over all parameters, every stats_every steps" },
    lr: { title: "Learning rate", hint: "per param group", logY: false },
    rate: { title: "Step rate", hint: "steps per second", logY: false },
    lag: { title: "Worker lag", hint: "versions since each worker's last gradient was computed", logY: false },
    time: { title: "Step time", hint: "milliseconds to average and apply one step", logY: "auto" },
    scalars: { title: "Custom scalars", hint: "reported with pushes", hidden: true },
  };
  const grid = $("#charts");
  for (const [key, d] of Object.entries(defs)) {
    const card = document.createElement("section");
    card.className = "card chart-card" + (d.hidden ? " hidden" : "");
    card.id = "chart-" + key;
    card.innerHTML = `<header><h3>${d.title}</h3><span class="hint">${d.hint}</span></header><div class="chart"></div>`;
    grid.appendChild(card);
    state.charts[key] = new LineChart(card.querySelector(".chart"), { logY: d.logY === undefined ? "auto" : d.logY });
  }
}

function ema(points, alpha) {
  let m = null;
  return points.map(([x, y]) => [x, (m = m === null ? y : m + alpha * (y - m))]);
}

function drawCharts() {
  const h = state.history, C = state.charts;
  const loss = h.filter((e) => e.loss !== null).map((e) => [e.version, e.loss]);
  C.loss.opts.empty = "no loss reported (RemoteAdam.report_loss or push_grad(loss=...))";
  C.loss.setData([
    { label: "loss", color: "rgba(37,99,235,0.35)", points: loss, width: 1 },
    { label: "smoothed", color: PALETTE[0], points: ema(loss, 0.1), width: 2.25 },
  ]);
  C.grad.setData([
    { label: "gradient", color: PALETTE[1], points: h.filter((e) => e.grad_norm !== null).map((e) => [e.version, e.grad_norm]) },
    { label: "update", color: PALETTE[3], points: h.filter((e) => e.update_norm !== null).map((e) => [e.version, e.update_norm]) },
  ]);
  const groups = h.length ? h[h.length - 1].lr.length : 0;
  C.lr.setData([...Array(groups).keys()].map((g) => ({
    label: "group " + g, color: PALETTE[(g + 2) % PALETTE.length], points: h.map((e) => [e.version, e.lr[g]]),
  })));
  const rate = [];
  for (let i = 1; i < h.length; i++) {
    const j = Math.max(0, i - 20), dt = h[i].time - h[j].time;
    if (dt > 0) rate.push([h[i].version, (i - j) / dt]);
  }
  C.rate.setData([{ label: "steps/s", color: PALETTE[5], points: rate }]);
  const ranks = [...new Set(h.flatMap((e) => Object.keys(e.lag)))].sort((a, b) => a - b);
  C.lag.setData(ranks.slice(0, PALETTE.length).map((r, i) => ({
    label: "rank " + r, color: PALETTE[i], points: h.filter((e) => r in e.lag).map((e) => [e.version, e.lag[r]]),
  })));
  C.time.setData([{ label: "ms", color: PALETTE[6], points: h.map((e) => [e.version, e.step_ms]) }]);
  const keys = [...new Set(h.flatMap((e) => Object.keys(e.scalars)))].sort();
  $("#chart-scalars").classList.toggle("hidden", !keys.length);
  if (keys.length) {
    C.scalars.setData(keys.slice(0, PALETTE.length).map((k, i) => ({
      label: k, color: PALETTE[i], points: h.filter((e) => k in e.scalars).map((e) => [e.version, e.scalars[k]]),
    })));
  }
}

function renderModelList() {
  const list = $("#models");
  if (!state.models.length) {
    list.innerHTML = `<p class="muted small">No models yet.</p>`;
    return;
  }
  // Keyed update: each model keeps its <a> across polls, so a click that lands
  // between two refreshes still reaches the entry the user pressed.
  const kept = new Map([...list.querySelectorAll("a.model")].map((a) => [a.dataset.model, a]));
  list.querySelectorAll(":scope > :not(a.model)").forEach((e) => e.remove());
  for (const m of state.models) {
    let a = kept.get(m.name);
    kept.delete(m.name);
    if (!a) {
      a = document.createElement("a");
      a.dataset.model = m.name;
      a.href = "#" + encodeURIComponent(m.name);
    }
    a.className = "model" + (m.name === state.selected ? " active" : "");
    const html = `
      <div class="model-name">${esc(m.name)}</div>
      <div class="model-meta"><span>v${m.version}</span><span>${m.mode}${m.world_size > 1 ? " ×" + m.world_size : ""}</span>
        <span>${Fmt.num(m.step_rate)}/s</span></div>
      <div class="model-meta"><span>loss ${Fmt.num(m.last_loss)}</span><span>${Fmt.count(m.num_elements)} params</span></div>`;
    if (a.dataset.html !== html) { a.innerHTML = html; a.dataset.html = html; }
    list.appendChild(a);  // appending an existing child moves it: list order follows state.models
  }
  kept.forEach((a) => a.remove());
}

function tile(label, value, sub) {
  return `<div class="tile"><div class="tile-label">${label}</div><div class="tile-value">${value}</div>${sub ? `<div class="tile-sub">${sub}</div>` : ""}</div>`;
}

function renderDetail(m) {
  $("#model-title").textContent = m.name;
  $("#model-badges").innerHTML = [m.mode, m.elastic ? "elastic" : "world " + m.world_size, m.device, ...m.dtypes]
    .map((b) => `<span class="badge">${esc(b)}</span>`).join("");
  const mem = m.memory;
  $("#tiles").innerHTML = [
    tile("version", m.version, m.skipped_steps ? `${m.skipped_steps} skipped` : "steps applied"),
    tile("step rate", Fmt.num(m.step_rate) + "/s", "last 30 s"),
    tile("loss", Fmt.num(m.last_loss), "last reported"),
    tile("parameters", Fmt.count(m.num_elements), `${m.num_params} tensors`),
    tile("memory", Fmt.bytes(mem.total), `state ${Fmt.bytes(mem.optimizer_state)}`),
    tile("workers", m.mode === "sync" ? `${m.workers.length}/${m.world_size}` : `${m.workers.length}`,
      m.workers.length ? `max lag ${Math.max(...m.workers.map((w) => w.lag))}` : "none heard yet"),
    ...(m.shard && m.shard.servers ? [tile("shard", `${m.shard.index} of ${m.shard.of}`,
      esc(`layout ${m.shard.layout_id}: ${m.shard.params_here.length} tensors here, of ${m.shard.servers.join(", ")}`))] : []),
    ...(m.elastic ? [tile("members", m.members.length, m.members.length
      ? m.members.map((w) => `rank ${w.rank}: lease ${Fmt.num(w.lease_left_s)} s`).join(", ")
      : `lease ${Fmt.num(m.lease_s)} s, none registered`)] : []),
  ].join("");
  $("#groups").innerHTML = `<tr><th>group</th><th class="num">lr</th><th class="num">betas</th><th class="num">eps</th>
      <th class="num">weight decay</th><th>amsgrad</th><th>impl</th><th>params</th></tr>` +
    m.param_groups.map((g) => {
      const hp = g.hyperparameters;
      return `<tr><td>${g.index}</td><td class="num">${Fmt.num(hp.lr)}</td><td class="num">${(hp.betas || []).map(Fmt.num).join(", ")}</td>
        <td class="num">${Fmt.num(hp.eps)}</td><td class="num">${Fmt.num(hp.weight_decay)}</td><td>${hp.amsgrad ? "yes" : "no"}</td>
        <td>${g.implementation}</td><td class="small">${g.params.map(esc).join(", ")}</td></tr>`;
    }).join("");
}

function renderParams(p) {
  const rows = p.params;
  const maxRatio = Math.max(1e-12, ...rows.map((r) => r.update_to_weight || 0));
  $("#params").innerHTML = `<tr><th>parameter</th><th>shape</th><th>dtype</th><th class="num">step</th><th class="num">norm</th>
      <th class="num">grad norm</th><th class="num">exp_avg norm</th><th class="num">exp_avg_sq mean</th><th class="num">update / weight</th></tr>` +
    rows.map((r) => `<tr><td class="mono">${esc(r.name)}</td><td class="mono">[${r.shape.join(", ")}]</td><td>${r.dtype}</td>
      <td class="num">${r.step}</td><td class="num">${Fmt.num(r.norm)}</td><td class="num">${Fmt.num(r.grad_norm)}</td>
      <td class="num">${Fmt.num(r.exp_avg_norm)}</td><td class="num">${Fmt.num(r.exp_avg_sq_mean)}</td>
      <td class="num ratio"><span class="bar" style="width:${Math.round(100 * (r.update_to_weight || 0) / maxRatio)}%"></span><span class="val">${Fmt.num(r.update_to_weight)}</span></td></tr>`).join("");
  $("#params-version").textContent = `at version ${p.version}`;
}

async function pollSelected() {
  const name = state.selected;
  if (!name) return;
  const q = state.lastVersion >= 0 ? `?since=${state.lastVersion}` : `?limit=${KEEP}`;
  const base = `/v1/models/${encodeURIComponent(name)}`;
  const [detail, hist, params] = await Promise.all([
    getJSON(base),
    getJSON(`${base}/history${q}`),
    // per-parameter statistics need the token when the server has one (401): the table stays empty
    state.polls % PARAMS_EVERY === 0 ? getJSON(`${base}/params`).catch(() => null) : null,
  ]);
  if (name !== state.selected) return;
  if (hist.version < state.lastVersion) { state.history = []; state.lastVersion = -1; return; } // recreated
  if (hist.steps.length) {
    state.history = state.history.concat(hist.steps).slice(-KEEP);
    state.lastVersion = hist.steps[hist.steps.length - 1].version;
  }
  renderDetail(detail);
  drawCharts();
  if (params) renderParams(params);
}

function select(name) {
  if (name === state.selected) return;
  state.selected = name;
  state.history = [];
  state.lastVersion = -1;
  state.polls = 0;
  $("#detail").classList.toggle("hidden", !name);
  $("#empty").classList.toggle("hidden", !!name);
}

async function poll() {
  try {
    const data = await getJSON("/v1/models");
    state.models = data.models;
    const s = data.server;
    $("#server").textContent = `${s.device} · up ${Math.floor(s.uptime_s / 60)} min · adamd ${s.version} · torch ${s.torch}`;
    const wanted = decodeURIComponent(location.hash.slice(1));
    const names = state.models.map((m) => m.name);
    select(names.includes(wanted) ? wanted : names.includes(state.selected) ? state.selected : names[0] || null);
    renderModelList();
    await pollSelected();
    state.polls++;
    state.updated = Date.now();
    $("#status").className = "status live";
    $("#status-text").textContent = "live";
  } catch (err) {
    $("#status").className = "status down";
    $("#status-text").textContent = err.status === 404 ? "model gone" : "disconnected";
    if (err.status === 404) { state.selected = null; }
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

window.addEventListener("hashchange", () => select(decodeURIComponent(location.hash.slice(1)) || state.selected));
makeCharts();
poll();
