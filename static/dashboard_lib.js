// Pure helpers of the EPLB dashboard: numbers in, numbers or strings out. No DOM, no canvas, so
// node's test runner can check them (tests/js/dashboard_lib.test.mjs).

export function clamp(value, lo, hi) {
  return Math.min(hi, Math.max(lo, value));
}

export function sum(values) {
  let total = 0;
  for (const v of values) total += v;
  return total;
}

export function mean(values) {
  return values.length ? sum(values) / values.length : 0;
}

// Index of the largest value (the first one on ties); -1 for an empty row.
export function argmax(values) {
  let best = -1;
  for (let i = 0; i < values.length; i++) if (best < 0 || values[i] > values[best]) best = i;
  return best;
}

// EPLB's balancedness of one layer: mean rank load / max rank load (1 = perfect). An idle layer
// (no load at all) counts as perfectly balanced, as on the server.
export function balancedness(rankLoad) {
  const max = Math.max(0, ...rankLoad);
  return max > 0 ? mean(rankLoad) / max : 1;
}

// Each row divided by its own mean: 1 = a fair share, 2 = twice the layer's average. Rows without
// load stay 0 (nothing to compare).
export function normalizeRowsByMean(matrix) {
  return matrix.map((row) => {
    const m = mean(row);
    return row.map((v) => (m > 0 ? v / m : 0));
  });
}

// Each row divided by its own maximum: 1 = the layer's hottest cell.
export function normalizeRowsByMax(matrix) {
  return matrix.map((row) => {
    const max = Math.max(0, ...row);
    return row.map((v) => (max > 0 ? v / max : 0));
  });
}

// Maps [d0, d1] linearly onto [r0, r1] (no clamping); a degenerate domain maps to r0.
export function linearScale(d0, d1, r0, r1) {
  const span = d1 - d0;
  return (x) => (span === 0 ? r0 : r0 + ((x - d0) / span) * (r1 - r0));
}

// About `count` round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const rough = (hi - lo) / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(roundTo(t, step));
  return ticks;
}

function roundTo(value, step) {
  const digits = Math.max(0, -Math.floor(Math.log10(step)) + 1);
  return Number(value.toFixed(digits));
}

export function hexToRgb(hex) {
  const n = parseInt(hex.replace("#", ""), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

export function rgbToCss([r, g, b]) {
  return `rgb(${Math.round(r)}, ${Math.round(g)}, ${Math.round(b)})`;
}

// Colour at t in [0, 1] along evenly spaced hex stops (t is clamped).
export function interpolateStops(stops, t) {
  const x = clamp(Number.isFinite(t) ? t : 0, 0, 1) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const a = hexToRgb(stops[i]);
  const b = hexToRgb(stops[i + 1]);
  const f = x - i;
  return rgbToCss(a.map((v, k) => v + (b[k] - v) * f));
}

// Cold -> fair share -> hot, for load relative to the layer mean: blue below 1, white at 1, red above.
export const DIVERGING_STOPS = ["#2c5aa0", "#8fb3de", "#f7f7f7", "#f2a07b", "#c0392b", "#6e1111"];
export const LOAD_RATIO_MAX = 2.5; // ratios at or above this share the darkest red

// Position on the diverging scale of a load ratio (1 = fair share sits at the white stop).
export function ratioToUnit(ratio) {
  const r = clamp(ratio, 0, LOAD_RATIO_MAX);
  return r <= 1 ? r * 0.4 : 0.4 + ((r - 1) / (LOAD_RATIO_MAX - 1)) * 0.6;
}

export function loadRatioColor(ratio) {
  return interpolateStops(DIVERGING_STOPS, ratioToUnit(ratio));
}

// Pale to dark, for "share of the layer's hottest expert" (0..1).
export const SEQUENTIAL_STOPS = ["#fbfbf7", "#fde3a7", "#f9a65a", "#e1552f", "#9e1b1b", "#3d0909"];

export function shareColor(share) {
  return interpolateStops(SEQUENTIAL_STOPS, share);
}

// Replica counts (logcnt): 1 is the norm, so it stays white; more replicas are darker greens.
export const REPLICA_COLORS = ["#ffffff", "#ffffff", "#a8dcb5", "#4daf6f", "#1d6b3a", "#0b3a1e"];

export function replicaColor(count) {
  return REPLICA_COLORS[clamp(Math.round(count), 0, REPLICA_COLORS.length - 1)];
}

// A distinct, light hue per logical expert (golden-angle steps), for the placement grid.
export function expertColor(expert) {
  const hue = (expert * 137.508) % 360;
  return `hsl(${hue.toFixed(1)}, 62%, ${expert % 2 ? 78 : 70}%)`;
}

// Balancedness (0..1) as a traffic light for numbers printed next to the heatmap rows.
export function balancednessColor(value) {
  if (value >= 0.9) return "#1d7a3a";
  if (value >= 0.75) return "#a86b00";
  return "#b42318";
}

// Black or white text, whichever reads better on an "rgb(r, g, b)" or "#rrggbb" background.
export function textColorOn(background) {
  const rgb = background.startsWith("#") ? hexToRgb(background) : background.match(/\d+/g).map(Number);
  const luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255;
  return luminance > 0.55 ? "#111" : "#fff";
}

// Slot s of P lives on rank floor(s / (P / G)): every rank holds P / G consecutive slots.
export function rankOfSlot(slot, numPhysical, numRanks) {
  return Math.floor(slot / (numPhysical / numRanks));
}

// [layer][slot] booleans from /eplb/state's changed_slots (per layer, the slots the latest rebalance
// rewrites); null when the server sent none.
export function changedSlotMask(changedSlots, numPhysical) {
  if (!changedSlots) return null;
  return changedSlots.map((slots) => {
    const row = new Array(numPhysical).fill(false);
    for (const slot of slots) row[slot] = true;
    return row;
  });
}

export function countTrue(matrix) {
  let n = 0;
  for (const row of matrix || []) for (const v of row) if (v) n++;
  return n;
}

// Cell size in CSS pixels so that `count` cells fit `available` pixels, within [min, max].
export function cellSize(available, count, min, max) {
  return count > 0 ? clamp(Math.floor(available / count), min, max) : max;
}

export function formatNumber(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toFixed(digits);
}

export function formatMiB(bytes) {
  return bytes === null || bytes === undefined ? "–" : (bytes / 2 ** 20).toFixed(1);
}

export function formatMs(seconds) {
  return seconds === null || seconds === undefined ? "–" : (seconds * 1e3).toFixed(1);
}

// Integer with thin thousands separators (locale-independent, so tests and screenshots agree).
export function formatCount(value) {
  return String(Math.round(value)).replace(/\B(?=(\d{3})+(?!\d))/g, "\u2009");
}

// A pale background per EP rank (for the route table's picks), distinct for neighbouring ranks.
export function rankColor(rank, numRanks) {
  const hue = numRanks <= 12 ? (rank * 360) / Math.max(1, numRanks) : (rank * 137.508) % 360;
  return `hsl(${(hue + 210) % 360}, 70%, 86%)`;
}

// Short axis labels: 950, 12k, 3.4M (one decimal below 10 of a unit).
export function formatCompact(value) {
  const abs = Math.abs(value);
  for (const [size, unit] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (abs >= size) {
      const scaled = value / size;
      return `${Math.abs(scaled) < 10 ? Number(scaled.toFixed(1)) : Math.round(scaled)}${unit}`;
    }
  }
  return `${Number(value.toFixed(2))}`;
}
