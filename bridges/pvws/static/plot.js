// A time plot on a <canvas>: samples (t in ms since epoch, y) of one readback over a window.

const MAX_SAMPLES = 20000; // per PV; at 10 Hz that is over half an hour

/** Per-PV sample history, kept for every readback the page receives. */
export class History {
  constructor() {
    this.samples = new Map();
  }

  /** Add sample (t ms, y) to `pv`; non-finite y values are gaps. */
  add(pv, t, y) {
    let s = this.samples.get(pv);
    if (!s) {
      s = [];
      this.samples.set(pv, s);
    }
    s.push([t, y]);
    if (s.length > MAX_SAMPLES) s.splice(0, s.length - MAX_SAMPLES);
  }

  /** Samples of `pv` not older than `since` ms (plus the one before, so the line starts at the edge). */
  since(pv, since) {
    const s = this.samples.get(pv) || [];
    let i = s.length;
    while (i > 0 && s[i - 1][0] >= since) i--;
    return s.slice(Math.max(0, i - 1));
  }
}

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

/**
 * Draw `samples` ([[t ms, y], ...]) from `now - windowS` to `now` on `canvas`, with a y axis
 * labelled in `units` and a time axis in seconds before now.
 */
export function drawPlot(canvas, samples, now, windowS, label, units) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  const left = 60;
  const right = 10;
  const top = 18;
  const bottom = 24;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#212121";
  ctx.fillText(label + (units ? ` [${units}]` : ""), left, 12);
  const t0 = now - windowS * 1000;
  const ys = samples.filter(([, y]) => Number.isFinite(y)).map(([, y]) => y);
  if (ys.length === 0) {
    ctx.fillText("no data yet", left + 10, top + 20);
    return;
  }
  let lo = Math.min(...ys);
  let hi = Math.max(...ys);
  if (hi - lo < 1e-9) {
    lo -= 1;
    hi += 1;
  }
  const pad = (hi - lo) * 0.05;
  lo -= pad;
  hi += pad;
  const x = (t) => left + ((t - t0) / (windowS * 1000)) * (w - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (h - top - bottom);
  ctx.strokeStyle = "#e0e0e0";
  ctx.fillStyle = "#616161";
  const ystep = niceStep(hi - lo, 5);
  for (let v = Math.ceil(lo / ystep) * ystep; v <= hi; v += ystep) {
    ctx.beginPath();
    ctx.moveTo(left, y(v));
    ctx.lineTo(w - right, y(v));
    ctx.stroke();
    ctx.fillText(Number(v.toPrecision(6)).toString(), 4, y(v) + 4);
  }
  const tstep = niceStep(windowS, 6);
  for (let s = 0; s <= windowS; s += tstep) {
    const xt = x(now - s * 1000);
    ctx.beginPath();
    ctx.moveTo(xt, top);
    ctx.lineTo(xt, h - bottom);
    ctx.stroke();
    ctx.fillText(s === 0 ? "now" : `-${s} s`, xt - 12, h - 8);
  }
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top, w - left - right, h - top - bottom);
  ctx.clip();
  ctx.strokeStyle = "#1565c0";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let pen = false;
  let last = null;
  for (const [t, v] of samples) {
    if (!Number.isFinite(v)) {
      pen = false;
      last = null;
      continue;
    }
    // a readback holds its value until the next update: draw steps
    if (pen && last !== null) ctx.lineTo(x(t), y(last));
    if (pen) ctx.lineTo(x(t), y(v));
    else ctx.moveTo(x(t), y(v));
    pen = true;
    last = v;
  }
  if (pen && last !== null) ctx.lineTo(x(now), y(last));
  ctx.stroke();
  ctx.restore();
}
