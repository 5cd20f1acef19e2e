// adamd dashboard: a small canvas line chart, no dependencies (the dashboard must work offline).
// LineChart draws several series of [x, y] points with nice ticks, an automatic log scale when the
// values span decades (loss, gradient norms), a legend, and a crosshair tooltip on hover.
"use strict";

const Fmt = {
  num(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    if (a >= 100) return v.toFixed(0);
    return Number(v.toPrecision(4)).toString();
  },
  bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
  },
  count(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(2) + " G";
    if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
    return String(n);
  },
};

// Ticks at 1, 2 or 5 times a power of ten, about `count` of them across [lo, hi].
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || mag * 10;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

class LineChart {
  constructor(container, opts) {
    this.opts = Object.assign({ yLabel: "", logY: "auto", xLabel: "step", empty: "no data yet" }, opts);
    this.el = container;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "chart-canvas";
    this.canvas.dataset.points = "0";
    this.tip = document.createElement("div");
    this.tip.className = "chart-tip";
    container.appendChild(this.canvas);
    container.appendChild(this.tip);
    this.series = [];
    this.hoverX = null;
    this.canvas.addEventListener("mousemove", (e) => this._hover(e));
    this.canvas.addEventListener("mouseleave", () => { this.hoverX = null; this.tip.style.display = "none"; this.draw(); });
    if (window.ResizeObserver) new ResizeObserver(() => this.draw()).observe(container);
  }

  // series: [{label, color, points: [[x, y], ...], width?, dash?}]
  setData(series) {
    this.series = series.map((s) => ({ ...s, points: s.points.filter((p) => p[1] !== null && isFinite(p[1])) }));
    this.draw();
  }

  _scales(w, h, pad) {
    let xs = [], ys = [];
    for (const s of this.series) for (const [x, y] of s.points) { xs.push(x); ys.push(y); }
    let xMin = Math.min(...xs), xMax = Math.max(...xs);
    if (xMin === xMax) { xMin -= 1; xMax += 1; }
    const positive = ys.every((y) => y > 0);
    let yMin = Math.min(...ys), yMax = Math.max(...ys);
    const log = this.opts.logY === true || (this.opts.logY === "auto" && positive && yMax / yMin > 50);
    if (log) { yMin = Math.log10(yMin); yMax = Math.log10(yMax); }
    if (yMin === yMax) { const d = Math.abs(yMin) * 0.1 || 1; yMin -= d; yMax += d; }
    const span = yMax - yMin;
    yMax += span * 0.06;
    if (!log && yMin >= 0 && yMin < span * 0.3) yMin = 0; else yMin -= span * 0.06;
    const fy = (y) => pad.t + (h - pad.t - pad.b) * (1 - ((log ? Math.log10(y) : y) - yMin) / (yMax - yMin));
    const fx = (x) => pad.l + (w - pad.l - pad.r) * (x - xMin) / (xMax - xMin);
    const inv = (px) => xMin + (px - pad.l) / (w - pad.l - pad.r) * (xMax - xMin);
    return { fx, fy, inv, xMin, xMax, yMin, yMax, log };
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = this.el.clientWidth, h = this.el.clientHeight;
    if (!w || !h) return;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
      c.style.width = w + "px"; c.style.height = h + "px";
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const grid = css.getPropertyValue("--grid").trim() || "#e5e7eb";
    const muted = css.getPropertyValue("--muted").trim() || "#6b7280";
    g.font = "11px ui-sans-serif, system-ui, sans-serif";
    const total = this.series.reduce((n, s) => n + s.points.length, 0);
    c.dataset.points = String(total);
    if (!total) {
      g.fillStyle = muted; g.textAlign = "center"; g.textBaseline = "middle";
      g.fillText(this.opts.empty, w / 2, h / 2);
      c.dataset.drawn = "empty";
      return;
    }
    const pad = { l: 54, r: 12, t: 22, b: 24 };
    const sc = this._scales(w, h, pad);
    // Grid and y ticks.
    g.strokeStyle = grid; g.lineWidth = 1; g.fillStyle = muted;
    g.textAlign = "right"; g.textBaseline = "middle";
    const yTicks = sc.log
      ? niceTicks(Math.floor(sc.yMin), Math.ceil(sc.yMax), Math.min(5, Math.ceil(sc.yMax) - Math.floor(sc.yMin)) || 1)
          .filter((t) => Number.isInteger(t) && t >= sc.yMin && t <= sc.yMax).map((t) => Math.pow(10, t))
      : niceTicks(sc.yMin, sc.yMax, 4);
    for (const t of yTicks) {
      const y = Math.round(sc.fy(t)) + 0.5;
      if (y < pad.t - 1 || y > h - pad.b + 1) continue;
      g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke();
      g.fillText(Fmt.num(t), pad.l - 6, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    for (const t of niceTicks(sc.xMin, sc.xMax, Math.max(2, Math.floor(w / 90)))) {
      const x = Math.round(sc.fx(t)) + 0.5;
      g.beginPath(); g.moveTo(x, h - pad.b); g.lineTo(x, h - pad.b + 4); g.stroke();
      g.fillText(Fmt.num(t), x, h - pad.b + 6);
    }
    g.beginPath(); g.moveTo(pad.l, h - pad.b + 0.5); g.lineTo(w - pad.r, h - pad.b + 0.5); g.stroke();
    if (sc.log) { g.textAlign = "left"; g.textBaseline = "top"; g.fillText("log", 4, 4); }
    // Lines (a lone point gets a dot so it is visible).
    g.save();
    g.beginPath(); g.rect(pad.l, pad.t - 4, w - pad.l - pad.r, h - pad.t - pad.b + 8); g.clip();
    for (const s of this.series) {
      if (!s.points.length) continue;
      g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = s.width || 1.75;
      g.setLineDash(s.dash || []); g.lineJoin = "round";
      g.beginPath();
      s.points.forEach(([x, y], i) => (i ? g.lineTo(sc.fx(x), sc.fy(y)) : g.moveTo(sc.fx(x), sc.fy(y))));
      g.stroke();
      if (s.points.length === 1 || s.dots) {
        for (const [x, y] of s.points) { g.beginPath(); g.arc(sc.fx(x), sc.fy(y), 2.5, 0, 2 * Math.PI); g.fill(); }
      }
    }
    g.restore();
    g.setLineDash([]);
    // Legend, top right.
    let lx = w - pad.r;
    g.textAlign = "right"; g.textBaseline = "middle";
    for (const s of [...this.series].reverse()) {
      if (!s.label) continue;
      const tw = g.measureText(s.label).width;
      g.fillStyle = muted; g.fillText(s.label, lx, 10);
      g.fillStyle = s.color; g.fillRect(lx - tw - 14, 9, 10, 3);
      lx -= tw + 26;
    }
    this._crosshair(g, sc, pad, w, h);
    c.dataset.drawn = "data";
  }

  _crosshair(g, sc, pad, w, h) {
    if (this.hoverX === null) return;
    const x = sc.inv(this.hoverX);
    const rows = [];
    let nearestX = null;
    for (const s of this.series) {
      let best = null;
      for (const p of s.points) if (!best || Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
      if (best) { rows.push([s, best]); if (nearestX === null || Math.abs(best[0] - x) < Math.abs(nearestX - x)) nearestX = best[0]; }
    }
    if (nearestX === null) return;
    const px = sc.fx(nearestX);
    g.strokeStyle = "rgba(100,116,139,0.6)"; g.beginPath(); g.moveTo(px, pad.t); g.lineTo(px, h - pad.b); g.stroke();
    for (const [s, p] of rows) { g.fillStyle = s.color; g.beginPath(); g.arc(sc.fx(p[0]), sc.fy(p[1]), 3.5, 0, 2 * Math.PI); g.fill(); }
    this.tip.innerHTML = `<b>${this.opts.xLabel} ${Fmt.num(nearestX)}</b>` +
      rows.map(([s, p]) => `<div><i style="background:${s.color}"></i>${s.label || ""} ${Fmt.num(p[1])}</div>`).join("");
    this.tip.style.display = "block";
    const left = px + 12 + this.tip.offsetWidth > w ? px - 12 - this.tip.offsetWidth : px + 12;
    this.tip.style.left = left + "px"; this.tip.style.top = pad.t + "px";
  }

  _hover(e) {
    const r = this.canvas.getBoundingClientRect();
    this.hoverX = e.clientX - r.left;
    this.draw();
  }
}

window.LineChart = LineChart;
window.Fmt = Fmt;
