// Canvas drawing for the EPLB dashboard: heatmaps, a line chart, bars and colour legends.
// Canvas, not DOM cells: 43 layers x 288 slots is 12 000 cells, which a canvas redraws in a few ms.
import { clamp, linearScale, niceTicks } from "./dashboard_lib.js";

const FONT = "12px system-ui, -apple-system, 'Segoe UI', sans-serif";
const SMALL_FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";
const AXIS_COLOR = "#444";
const GRID_COLOR = "#e4e4e4";

// Sizes the canvas to its CSS width and the given CSS height, sharp on high-DPI screens.
export function prepareCanvas(canvas, cssHeight) {
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = Math.max(200, canvas.parentElement.clientWidth);
  canvas.style.width = `${cssWidth}px`;
  canvas.style.height = `${cssHeight}px`;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssWidth, cssHeight);
  ctx.font = FONT;
  return { ctx, width: cssWidth, height: cssHeight };
}

function text(ctx, value, x, y, { align = "left", baseline = "middle", color = AXIS_COLOR, font = FONT } = {}) {
  ctx.fillStyle = color;
  ctx.font = font;
  ctx.textAlign = align;
  ctx.textBaseline = baseline;
  ctx.fillText(value, x, y);
}

function verticalTitle(ctx, value, x, y) {
  ctx.save();
  ctx.translate(x, y);
  ctx.rotate(-Math.PI / 2);
  text(ctx, value, 0, 0, { align: "center" });
  ctx.restore();
}

// Column edges rounded to whole pixels, so neighbouring cells neither overlap nor leave gaps.
function edges(start, size, count) {
  const out = new Array(count + 1);
  for (let i = 0; i <= count; i++) out[i] = Math.round(start + (i * size) / count);
  return out;
}

// Every how many columns a label fits (labels need about `labelWidth` pixels).
function labelStride(cellWidth, labelWidth) {
  const stride = Math.ceil(labelWidth / Math.max(cellWidth, 0.1));
  return [1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100].find((s) => s >= stride) || stride;
}

/* A rows x cols grid of coloured cells with axes. spec:
   rows, cols, rowHeight, cellColor(r, c), xTitle, yTitle, rowLabel(r), colLabel(c),
   optional: rightLabel(r) -> {text, color}, rightTitle, outline(r, c), cellText(r, c),
   groups: {size, label(g)} (thick lines every `size` columns, labels above), highlight(r, c).
   Returns the geometry for hit testing: {x0, y0, colEdges, rowEdges}. */
export function drawHeatmap(canvas, spec) {
  const top = spec.groups || spec.rightTitle ? 22 : 6;
  const left = 48;
  const right = spec.rightLabel ? 84 : 10;   // room for "0.93" and the title "balancedness"
  const bottom = 40;
  const height = top + spec.rows * spec.rowHeight + bottom;
  const { ctx, width } = prepareCanvas(canvas, height);
  const colEdges = edges(left, width - left - right, spec.cols);
  const rowEdges = edges(top, spec.rows * spec.rowHeight, spec.rows);
  drawCells(ctx, spec, colEdges, rowEdges);
  if (spec.groups) drawGroups(ctx, spec, colEdges, rowEdges);
  drawHeatmapAxes(ctx, spec, colEdges, rowEdges, width, height);
  return { x0: left, y0: top, colEdges, rowEdges };
}

function drawCells(ctx, spec, colEdges, rowEdges) {
  const cellWidth = colEdges[1] - colEdges[0];
  const showText = spec.cellText && cellWidth >= 16 && spec.rowHeight >= 13;
  for (let r = 0; r < spec.rows; r++) {
    const y = rowEdges[r];
    const h = rowEdges[r + 1] - y;
    for (let c = 0; c < spec.cols; c++) {
      const x = colEdges[c];
      const w = colEdges[c + 1] - x;
      const color = spec.cellColor(r, c);
      ctx.fillStyle = color;
      ctx.fillRect(x, y, w, h);
      if (showText) drawCellText(ctx, spec.cellText(r, c), x + w / 2, y + h / 2, color);
    }
  }
  ctx.strokeStyle = "rgba(0, 0, 0, 0.08)";
  ctx.lineWidth = 1;
  if (cellWidth >= 6) for (const x of colEdges) line(ctx, x + 0.5, rowEdges[0], x + 0.5, rowEdges[spec.rows]);
  if (spec.outline) drawOutlines(ctx, spec, colEdges, rowEdges);
}

function drawCellText(ctx, value, x, y, background) {
  if (value === null || value === undefined || value === "") return;
  const rgb = background.match(/\d+/g);
  const dark = rgb && rgb.length >= 3 && 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 140;
  text(ctx, String(value), x, y + 0.5, { align: "center", color: dark ? "#fff" : "#222", font: SMALL_FONT });
}

// Marked cells: a black outline, or, in cells too narrow for one (released sizes: 2-4 px), a black
// bar over the cell's top half, which still reads as "these".
function drawOutlines(ctx, spec, colEdges, rowEdges) {
  const narrow = colEdges[1] - colEdges[0] < 8;
  ctx.strokeStyle = "#111";
  ctx.fillStyle = "#111";
  ctx.lineWidth = 2;
  for (let r = 0; r < spec.rows; r++) {
    for (let c = 0; c < spec.cols; c++) {
      if (!spec.outline(r, c)) continue;
      const x = colEdges[c];
      const y = rowEdges[r];
      const w = colEdges[c + 1] - x;
      const h = rowEdges[r + 1] - y;
      if (narrow) ctx.fillRect(x, y, w, Math.ceil(h / 2));
      else ctx.strokeRect(x + 1, y + 1, w - 2, h - 2);
    }
  }
}

function drawGroups(ctx, spec, colEdges, rowEdges) {
  const { size, label } = spec.groups;
  const numGroups = Math.ceil(spec.cols / size);
  ctx.strokeStyle = "#222";
  ctx.lineWidth = 2;
  for (let g = 0; g <= numGroups; g++) {
    const x = colEdges[Math.min(g * size, spec.cols)];
    line(ctx, x, rowEdges[0] - 4, x, rowEdges[spec.rows]);
  }
  const groupWidth = colEdges[Math.min(size, spec.cols)] - colEdges[0];
  const stride = labelStride(groupWidth, 52);
  for (let g = 0; g < numGroups; g += stride) {
    const middle = (colEdges[g * size] + colEdges[Math.min((g + 1) * size, spec.cols)]) / 2;
    text(ctx, label(g), middle, 10, { align: "center", font: SMALL_FONT });
  }
}

function drawHeatmapAxes(ctx, spec, colEdges, rowEdges, width, height) {
  const bottomY = rowEdges[spec.rows];
  const rowStride = labelStride(spec.rowHeight, 13);
  for (let r = 0; r < spec.rows; r += rowStride) {
    text(ctx, spec.rowLabel(r), colEdges[0] - 4, (rowEdges[r] + rowEdges[r + 1]) / 2, { align: "right", font: SMALL_FONT });
  }
  const colStride = labelStride(colEdges[1] - colEdges[0], 24);
  for (let c = 0; c < spec.cols; c += colStride) {
    text(ctx, spec.colLabel(c), (colEdges[c] + colEdges[c + 1]) / 2, bottomY + 9, { align: "center", font: SMALL_FONT });
  }
  text(ctx, spec.xTitle, (colEdges[0] + colEdges[spec.cols]) / 2, height - 9, { align: "center" });
  verticalTitle(ctx, spec.yTitle, 10, (rowEdges[0] + bottomY) / 2);
  if (!spec.rightLabel) return;
  const rightX = colEdges[spec.cols] + 6;
  for (let r = 0; r < spec.rows; r += rowStride) {
    const { text: value, color } = spec.rightLabel(r);
    text(ctx, value, rightX, (rowEdges[r] + rowEdges[r + 1]) / 2, { color, font: SMALL_FONT });
  }
  text(ctx, spec.rightTitle || "", rightX, 10, { font: SMALL_FONT });
}

function line(ctx, x1, y1, x2, y2) {
  ctx.beginPath();
  ctx.moveTo(x1, y1);
  ctx.lineTo(x2, y2);
  ctx.stroke();
}

// Which cell is under the mouse (null outside the grid).
export function cellAt(geometry, x, y) {
  const col = findEdge(geometry.colEdges, x);
  const row = findEdge(geometry.rowEdges, y);
  return col < 0 || row < 0 ? null : { row, col };
}

function findEdge(edgeList, value) {
  if (value < edgeList[0] || value >= edgeList[edgeList.length - 1]) return -1;
  let lo = 0;
  let hi = edgeList.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (edgeList[mid] <= value) lo = mid; else hi = mid;
  }
  return lo;
}

/* A colour scale: a gradient bar with ticks. spec: color(t) for t in [0, 1], ticks [{at, label}], title. */
export function drawLegend(canvas, spec) {
  const { ctx, width } = prepareCanvas(canvas, 40);
  const x0 = 8;
  const barWidth = Math.min(320, width - 16);
  for (let i = 0; i < barWidth; i++) {
    ctx.fillStyle = spec.color(i / (barWidth - 1));
    ctx.fillRect(x0 + i, 4, 1, 12);
  }
  ctx.strokeStyle = "#999";
  ctx.lineWidth = 1;
  ctx.strokeRect(x0 + 0.5, 4.5, barWidth - 1, 12);
  for (const { at, label } of spec.ticks) {
    const x = x0 + at * (barWidth - 1);
    line(ctx, x, 16, x, 20);
    text(ctx, label, x, 27, { align: "center", font: SMALL_FONT });
  }
  text(ctx, spec.title, x0 + barWidth + 12, 10, { font: SMALL_FONT });
}

/* Lines over steps. spec: series [{label, color, dash, points: [[x, y]]}], marks [{x, lines: [text]}],
   yMin, xTitle, yTitle, height. Returns the x scale (for tests and tooltips). */
export function drawLineChart(canvas, spec) {
  const { ctx, width, height } = prepareCanvas(canvas, spec.height || 240);
  const plot = { left: 52, right: width - 14, top: 14, bottom: height - 40 };
  const xs = spec.series.flatMap((s) => s.points.map((p) => p[0])).concat(spec.marks.map((m) => m.x));
  const xMin = xs.length ? Math.min(...xs) : 0;
  const xLast = xs.length ? Math.max(...xs, xMin + 1) : 1;
  const xMax = xLast + (xLast - xMin) * 0.04; // room for the newest mark and its label
  const x = linearScale(xMin, xMax, plot.left, plot.right);
  const y = linearScale(spec.yMin, 1, plot.bottom, plot.top);
  drawLineAxes(ctx, spec, plot, x, y, [xMin, xMax]);
  for (const mark of spec.marks) drawMark(ctx, mark, x, y, plot);
  for (const series of spec.series) drawSeries(ctx, series, x, y);
  return x;
}

function drawLineAxes(ctx, spec, plot, x, y, [xMin, xMax]) {
  ctx.lineWidth = 1;
  for (const tick of niceTicks(spec.yMin, 1, 5)) {
    ctx.strokeStyle = GRID_COLOR;
    line(ctx, plot.left, y(tick), plot.right, y(tick));
    text(ctx, tick.toFixed(2), plot.left - 6, y(tick), { align: "right", font: SMALL_FONT });
  }
  for (const tick of niceTicks(xMin, xMax, 8).filter((t) => Number.isInteger(t))) {
    text(ctx, String(tick), x(tick), plot.bottom + 10, { align: "center", font: SMALL_FONT });
  }
  ctx.strokeStyle = AXIS_COLOR;
  line(ctx, plot.left, plot.bottom, plot.right, plot.bottom);
  line(ctx, plot.left, plot.top, plot.left, plot.bottom);
  text(ctx, spec.xTitle, (plot.left + plot.right) / 2, plot.bottom + 28, { align: "center" });
  verticalTitle(ctx, spec.yTitle, 12, (plot.top + plot.bottom) / 2);
}

function drawSeries(ctx, series, x, y) {
  if (!series.points.length) return;
  ctx.strokeStyle = series.color;
  ctx.lineWidth = 2;
  ctx.setLineDash(series.dash || []);
  ctx.beginPath();
  series.points.forEach(([px, py], i) => (i ? ctx.lineTo(x(px), y(py)) : ctx.moveTo(x(px), y(py))));
  ctx.stroke();
  ctx.setLineDash([]);
  const [lastX, lastY] = series.points[series.points.length - 1];
  ctx.fillStyle = series.color;
  ctx.beginPath();
  ctx.arc(x(lastX), y(lastY), 3, 0, 2 * Math.PI);
  ctx.fill();
}

// A rebalance: a dashed vertical line, the predicted value as a hollow diamond, the measured one as
// a filled dot, and a short label.
function drawMark(ctx, mark, x, y, plot) {
  const px = x(mark.x);
  ctx.strokeStyle = "#7a5cc7";
  ctx.lineWidth = 1;
  ctx.setLineDash([4, 3]);
  line(ctx, px, plot.top, px, plot.bottom);
  ctx.setLineDash([]);
  if (mark.predicted !== null && mark.predicted !== undefined) {
    const py = y(clamp(mark.predicted, 0, 1));
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(px, py - 6); ctx.lineTo(px + 6, py); ctx.lineTo(px, py + 6); ctx.lineTo(px - 6, py); ctx.closePath();
    ctx.stroke();
  }
  if (mark.measured !== null && mark.measured !== undefined) {
    ctx.fillStyle = "#7a5cc7";
    ctx.beginPath();
    ctx.arc(px, y(clamp(mark.measured, 0, 1)), 4, 0, 2 * Math.PI);
    ctx.fill();
  }
  const nearRight = px > plot.right - 90;
  text(ctx, mark.label, nearRight ? px - 5 : px + 5, plot.bottom - 8,
    { align: nearRight ? "right" : "left", color: "#5b3fa8", font: SMALL_FONT });
}

/* Vertical bars. spec: values, label(i), color(i), xTitle, yTitle, format(v), height, meanLine. */
export function drawBars(canvas, spec) {
  const { ctx, width, height } = prepareCanvas(canvas, spec.height || 200);
  const plot = { left: 60, right: width - 14, top: 18, bottom: height - 40 };
  const maxValue = Math.max(1e-12, ...spec.values);
  const y = linearScale(0, maxValue * 1.12, plot.bottom, plot.top);
  for (const tick of niceTicks(0, maxValue * 1.12, 4)) {
    ctx.strokeStyle = GRID_COLOR;
    line(ctx, plot.left, y(tick), plot.right, y(tick));
    text(ctx, (spec.tickFormat || spec.format)(tick), plot.left - 6, y(tick), { align: "right", font: SMALL_FONT });
  }
  const colEdges = edges(plot.left, plot.right - plot.left, spec.values.length);
  const showValues = colEdges[1] - colEdges[0] >= 34;
  spec.values.forEach((value, i) => {
    const x = colEdges[i] + 2;
    const w = Math.max(1, colEdges[i + 1] - colEdges[i] - 4);
    ctx.fillStyle = spec.color(i);
    ctx.fillRect(x, y(value), w, plot.bottom - y(value));
    if (showValues) text(ctx, spec.format(value), x + w / 2, y(value) - 7, { align: "center", font: SMALL_FONT });
  });
  const stride = labelStride(colEdges[1] - colEdges[0], 20);
  for (let i = 0; i < spec.values.length; i += stride) {
    text(ctx, spec.label(i), (colEdges[i] + colEdges[i + 1]) / 2, plot.bottom + 10, { align: "center", font: SMALL_FONT });
  }
  if (spec.meanLine !== undefined) drawMeanLine(ctx, y(spec.meanLine), plot, `mean ${spec.format(spec.meanLine)}`);
  ctx.strokeStyle = AXIS_COLOR;
  line(ctx, plot.left, plot.bottom, plot.right, plot.bottom);
  text(ctx, spec.xTitle, (plot.left + plot.right) / 2, plot.bottom + 28, { align: "center" });
  verticalTitle(ctx, spec.yTitle, 12, (plot.top + plot.bottom) / 2);
}

function drawMeanLine(ctx, py, plot, label) {
  ctx.strokeStyle = "#333";
  ctx.lineWidth = 1;
  ctx.setLineDash([6, 4]);
  line(ctx, plot.left, py, plot.right, py);
  ctx.setLineDash([]);
  ctx.font = SMALL_FONT;
  const labelWidth = ctx.measureText(label).width + 8;
  ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
  ctx.fillRect(plot.right - labelWidth, py - 16, labelWidth, 14);
  text(ctx, label, plot.right - 4, py - 9, { align: "right", font: SMALL_FONT });
}
