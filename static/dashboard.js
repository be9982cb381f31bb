// The EPLB dashboard page: polls /eplb/state once a second and redraws every panel from it.
// Drawing is in dashboard_draw.js, pure helpers in dashboard_lib.js.
import * as draw from "./dashboard_draw.js";
import {
  argmax, balancedness, balancednessColor, changedSlotMask, countTrue, expertColor, formatCompact, formatCount,
  formatMiB, formatMs, formatNumber, loadRatioColor, LOAD_RATIO_MAX, mean, normalizeRowsByMax, normalizeRowsByMean,
  rankColor, ratioToUnit, replicaColor, REPLICA_COLORS, shareColor,
} from "./dashboard_lib.js";

const POLL_MS = 1000;
const REQUEST_TIMEOUT_MS = 8000;
const KEY_STORAGE = "dsv4-dashboard-api-key";

const $ = (id) => document.getElementById(id);

// What the page remembers between polls.
const view = {
  state: null,
  polling: false,
  changed: null,            // [layer][slot] booleans: slots changed by the last rebalance
  hover: {},                // canvas id -> {geometry, describe(row, col)}
  routes: null,
  selectedToken: 0,
};

class AuthNeeded extends Error {}

// ---------------------------------------------------------------- talking to the server

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers, cache: "no-store",
    signal: AbortSignal.timeout(options.timeoutMs || REQUEST_TIMEOUT_MS) });
  if (response.status === 401) throw new AuthNeeded();
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error?.message || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

async function poll() {
  view.polling = true;
  try {
    const state = await api("/eplb/state");
    setConnection("live", `live · updated ${new Date().toLocaleTimeString()}`);
    render(state);
  } catch (error) {
    if (error instanceof AuthNeeded) {
      askForKey();
      view.polling = false;
      return; // resumes when a key is entered
    }
    const loading = error.status === 503;
    setConnection(loading ? "loading" : "error", loading ? "model loading…" : `no data: ${error.message}`);
  }
  setTimeout(poll, POLL_MS);
}

function setConnection(status, label) {
  const box = $("connection");
  box.dataset.status = status;
  box.textContent = label;
}

function askForKey() {
  $("key-panel").hidden = false;
  $("key-error").textContent = sessionStorage.getItem(KEY_STORAGE) ? "that key was refused" : "";
  setConnection("error", "API key needed");
  $("key-input").focus();
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-panel").hidden = true;
  if (!view.polling) poll();
}

// ---------------------------------------------------------------- one poll's answer

function render(state) {
  const started = performance.now();
  view.state = state;
  document.body.dataset.eplb = state.enabled ? "on" : "off";
  $("eplb-off").hidden = state.enabled;
  for (const panel of document.querySelectorAll(".eplb-only")) panel.hidden = !state.enabled;
  if (!state.enabled) return;
  view.changed = changedSlotMask(state.changed_slots, state.num_physical);
  renderSummary(state);
  renderHistory(state);
  renderRankBars(state);
  renderLayerRank(state);
  renderPlacement(state);
  renderExperts(state);
  renderRebalances(state);
  document.body.dataset.renderedStep = String(state.step);
  document.body.dataset.renderMs = (performance.now() - started).toFixed(1);   // the browser test reads it
}

function worstLayerSeries(state) {
  return state.layer_balancedness_history.map(([step, perLayer]) => [step, Math.min(...perLayer)]);
}

function renderSummary(state) {
  $("summary").hidden = false;
  const perLayer = state.balancedness_per_layer;
  const worst = argmax(perLayer.map((b) => -b));
  setStat("stat-balancedness", formatNumber(state.balancedness), balancednessColor(state.balancedness));
  setStat("stat-worst", formatNumber(perLayer[worst]), balancednessColor(perLayer[worst]));
  $("stat-worst-hint").textContent = `layer ${worst} (of ${state.num_layers})`;
  $("stat-rebalances").textContent = String(state.counters.rebalances_total);
  const skipped = state.counters.rebalances_skipped_total || 0;
  $("stat-rebalances-hint").textContent = state.rebalance_in_progress
    ? `moving: ${state.rebalance_in_progress.layers_left} layers left` : `${skipped} skipped · every ${state.config.rebalance_num_iterations} steps`;
  $("stat-step").textContent = formatCount(state.step);
  $("stat-window").textContent = `window: last ${state.window_steps} of ${state.config.window} steps`;
  $("stat-layout").textContent = `${state.num_layers} layers · ${state.num_experts} experts · `
    + `${state.num_physical} slots · ${state.num_ranks} ranks`;
  $("stat-config").textContent = `${state.num_physical - state.num_experts} redundant slots, `
    + `${state.num_physical / state.num_ranks} slots per rank, ${state.config.algorithm} planner`;
}

function setStat(id, value, color) {
  const element = $(id);
  element.textContent = value;
  element.dataset.color = color;
  element.style.color = color;
}

// ---------------------------------------------------------------- panel 1: balancedness over time

function renderHistory(state) {
  const meanSeries = state.balancedness_history.map(([step, value]) => [step, value]);
  const worst = worstLayerSeries(state);
  const marks = state.rebalances.filter((r) => !r.skipped).map((r) => ({
    x: r.step, predicted: r.balancedness_predicted, measured: r.balancedness_measured,
    label: `${formatNumber(r.balancedness_before, 2)}→${formatNumber(r.balancedness_predicted, 2)}`
      + (r.balancedness_measured === null ? "" : `→${formatNumber(r.balancedness_measured, 2)}`),
  }));
  const values = meanSeries.concat(worst).map((p) => p[1]).concat(marks.flatMap((m) => [m.predicted, m.measured ?? 1]));
  const yMin = Math.max(0, Math.floor((Math.min(1, ...values) - 0.05) * 10) / 10);
  draw.drawLineChart($("chart-balancedness"), {
    height: 250, yMin, xTitle: "engine step", yTitle: "balancedness (1 = perfect)", marks,
    series: [{ label: "worst layer", color: "#e07b00", dash: [6, 4], points: worst },
      { label: "mean", color: "#2c5aa0", points: meanSeries }],
  });
}

// ---------------------------------------------------------------- panel 5: per-rank bars

function renderRankBars(state) {
  const tokens = state.ranks.tokens_window || state.rank_load[0].map((_, g) => state.rank_load.reduce((s, row) => s + row[g], 0));
  const straggler = argmax(tokens);
  const canvas = $("chart-rank-tokens");
  canvas.dataset.values = JSON.stringify(tokens);
  draw.drawBars(canvas, {
    values: tokens, height: 250, label: (g) => `${g}`, xTitle: `EP rank (straggler: rank ${straggler})`,
    yTitle: "routed choices in window", format: (v) => formatCount(v), tickFormat: formatCompact, meanLine: mean(tokens),
    color: (g) => (g === straggler && tokens[g] > 0 ? "#c0392b" : "#6d8fc4"),
  });
  const seconds = state.ranks.moe_seconds_last_step;
  $("moe-seconds-box").hidden = !seconds;
  if (!seconds) return;
  const slowest = argmax(seconds);
  draw.drawBars($("chart-rank-seconds"), {
    values: seconds.map((s) => s * 1e3), height: 180, label: (g) => `${g}`, xTitle: "EP rank",
    yTitle: "MoE ms", format: (v) => v.toFixed(2), meanLine: mean(seconds) * 1e3,
    color: (g) => (g === slowest ? "#c0392b" : "#6d8fc4"),
  });
}

// ---------------------------------------------------------------- panel 2: layer x rank

function rowHeight(rows, budget, min, max) {
  return Math.max(min, Math.min(max, Math.floor(budget / Math.max(1, rows))));
}

function renderLayerRank(state) {
  const load = state.rank_load;
  const ratios = normalizeRowsByMean(load);
  const stragglers = load.map((row) => (Math.max(...row) > 0 ? argmax(row) : -1));
  const canvas = $("heat-rank");
  canvas.dataset.values = JSON.stringify(load);
  canvas.dataset.stragglers = JSON.stringify(stragglers);
  const geometry = draw.drawHeatmap(canvas, {
    rows: state.num_layers, cols: state.num_ranks, rowHeight: rowHeight(state.num_layers, 330, 7, 26),
    cellColor: (l, g) => loadRatioColor(ratios[l][g]), outline: (l, g) => g === stragglers[l],
    cellText: (l, g) => `${ratios[l][g].toFixed(2)}×`, rowLabel: (l) => `${l}`, colLabel: (g) => `${g}`,
    xTitle: "EP rank", yTitle: "layer", rightTitle: "balancedness",
    rightLabel: (l) => ({ text: formatNumber(state.balancedness_per_layer[l], 2), color: balancednessColor(state.balancedness_per_layer[l]) }),
  });
  view.hover["heat-rank"] = { geometry, describe: (l, g) => `layer ${l} · rank ${g}: ${formatCount(load[l][g])} choices, `
    + `${ratios[l][g].toFixed(2)}× the layer mean${g === stragglers[l] ? " (straggler)" : ""}; layer balancedness `
    + `${formatNumber(balancedness(load[l]))}` };
  drawRatioLegend();
}

function drawRatioLegend() {
  const unitToRatio = (t) => (t <= 0.4 ? t / 0.4 : 1 + ((t - 0.4) / 0.6) * (LOAD_RATIO_MAX - 1));
  draw.drawLegend($("legend-rank"), {
    color: (t) => loadRatioColor(unitToRatio(t)), title: "load ÷ layer mean (white = fair share)",
    ticks: [0, 0.5, 1, 1.5, 2, LOAD_RATIO_MAX].map((r) => ({ at: ratioToUnit(r), label: r === LOAD_RATIO_MAX ? `≥${r}×` : `${r}×` })),
  });
}

// ---------------------------------------------------------------- panel 4: placement

function renderPlacement(state) {
  const slotsPerRank = state.num_physical / state.num_ranks;
  const changed = view.changed;
  const anyMove = state.counters.rebalances_total > 0 || state.rebalance_in_progress;
  $("changed-count").textContent = anyMove ? `${countTrue(changed)} slots` : "no rebalance yet";
  const canvas = $("heat-placement");
  canvas.dataset.changed = String(changed ? countTrue(changed) : -1);
  const geometry = draw.drawHeatmap(canvas, {
    rows: state.num_layers, cols: state.num_physical, rowHeight: rowHeight(state.num_layers, 330, 7, 26),
    cellColor: (l, s) => expertColor(state.phy2log[l][s]), cellText: (l, s) => state.phy2log[l][s],
    outline: changed ? (l, s) => changed[l][s] : null, rowLabel: (l) => `${l}`, colLabel: (s) => `${s}`,
    groups: { size: slotsPerRank, label: (g) => `rank ${g}` }, xTitle: "physical slot", yTitle: "layer",
  });
  view.hover["heat-placement"] = { geometry, describe: (l, s) => `layer ${l} · slot ${s} (rank ${Math.floor(s / slotsPerRank)}): `
    + `expert ${state.phy2log[l][s]}, one of its ${state.logcnt[l][state.phy2log[l][s]]} replicas`
    + (changed && changed[l][s] ? " · changed by the last rebalance" : "") };
}

// ---------------------------------------------------------------- panel 3: layer x expert

function renderExperts(state) {
  const load = state.logical_load;
  const shares = normalizeRowsByMax(load);
  const height = rowHeight(state.num_layers, 300, 6, 22);
  const heat = $("heat-expert");
  heat.dataset.values = JSON.stringify(load);
  const common = { rows: state.num_layers, cols: state.num_experts, rowHeight: height, rowLabel: (l) => `${l}`,
    colLabel: (e) => `${e}`, xTitle: "logical expert", yTitle: "layer" };
  const geometry = draw.drawHeatmap(heat, { ...common, cellColor: (l, e) => shareColor(shares[l][e]) });
  view.hover["heat-expert"] = { geometry, describe: (l, e) => `layer ${l} · expert ${e}: ${formatCount(load[l][e])} `
    + `choices (${(shares[l][e] * 100).toFixed(0)}% of the layer's hottest), ${state.logcnt[l][e]} replica(s)` };
  const replicas = draw.drawHeatmap($("heat-replicas"), { ...common, cellColor: (l, e) => replicaColor(state.logcnt[l][e]),
    cellText: (l, e) => (state.logcnt[l][e] > 1 ? state.logcnt[l][e] : "") });
  view.hover["heat-replicas"] = { geometry: replicas, describe: (l, e) => `layer ${l} · expert ${e}: ${state.logcnt[l][e]} replica(s)` };
  drawExpertLegends();
}

function drawExpertLegends() {
  draw.drawLegend($("legend-expert"), {
    color: shareColor, title: "load ÷ the layer's hottest expert",
    ticks: [0, 0.25, 0.5, 0.75, 1].map((t) => ({ at: t, label: `${t * 100}%` })),
  });
  const top = REPLICA_COLORS.length - 1;
  draw.drawLegend($("legend-replicas"), {
    color: (t) => replicaColor(1 + Math.floor(t * top)), title: "replicas (logcnt): white = 1, greener = more",
    ticks: Array.from({ length: top }, (_, i) => ({ at: (i + 0.5) / top, label: i + 1 === top ? `${top}+` : `${i + 1}` })),
  });
}

// ---------------------------------------------------------------- panel 6: rebalances

function renderRebalances(state) {
  const body = $("rebalance-table").querySelector("tbody");
  const rows = [];
  if (state.rebalance_in_progress) rows.push(inProgressRow(state.rebalance_in_progress));
  const newest = state.rebalances.length - 1;
  state.rebalances.forEach((record, i) => rows.unshift(recordRow(record, i < newest)));
  body.replaceChildren(...rows);
  const c = state.counters;
  $("rebalance-note").textContent = `${c.rebalances_total} done, ${c.rebalances_skipped_total || 0} skipped; `
    + `${formatMiB(c.bytes_moved_total)} MiB moved and ${formatCount(c.slots_changed_total)} slots changed in all. `
    + `"measured" is the balancedness over the ${Math.min(state.config.window, state.config.rebalance_num_iterations)} steps after the move.`;
}

function cell(content, className) {
  const td = document.createElement("td");
  td.textContent = content;
  if (className) td.className = className;
  return td;
}

function inProgressRow(progress) {
  const tr = document.createElement("tr");
  tr.className = "in-progress";
  tr.append(cell("now"), cell(`moving: ${progress.layers_left} layers left`));
  for (let i = 0; i < 9; i++) tr.append(cell(""));
  return tr;
}

// superseded: a later rebalance started before this one's measuring window was over.
function recordStatus(record, superseded) {
  if (record.skipped) return `skipped: ${record.reason || "no reason given"}`;
  if (record.finished_step === null) return "moving";
  const done = record.forced ? "done (forced)" : "done";
  if (record.balancedness_measured === null) return superseded ? `${done}, not measured` : "measuring…";
  return done;
}

function recordRow(record, superseded) {
  const tr = document.createElement("tr");
  if (record.skipped) tr.className = "skipped";
  const measured = record.balancedness_measured;
  tr.append(cell(formatCount(record.step)), cell(recordStatus(record, superseded)), cell(formatNumber(record.balancedness_before)),
    cell(formatNumber(record.balancedness_predicted)),
    cell(formatNumber(measured), measured !== null && measured > record.balancedness_before ? "better" : ""),
    cell(record.skipped ? "–" : formatCount(record.slots_changed)), cell(record.skipped ? "–" : formatMiB(record.bytes_moved)),
    cell(formatMs(record.plan_seconds)), cell(record.skipped ? "–" : formatMs(record.move_seconds)),
    cell(record.skipped ? "–" : formatMs(record.longest_step_seconds)), cell(record.skipped ? "–" : `${record.layers_moved}`));
  return tr;
}

// ---------------------------------------------------------------- panel 7: rebalance now

async function onRebalanceClick() {
  const button = $("rebalance-button");
  const answer = $("rebalance-answer");
  button.disabled = true;
  try {
    const result = await api("/eplb/rebalance", { method: "POST", timeoutMs: 60000 });
    answer.textContent = `${describeRebalance(result)}\n${JSON.stringify(result, null, 1)}`;
  } catch (error) {
    answer.textContent = error instanceof AuthNeeded ? "API key needed" : `failed: ${error.message}`;
  } finally {
    answer.hidden = false;
    button.disabled = false;
  }
}

function describeRebalance(result) {
  if (result.status === "started") {
    return `Started: balancedness ${formatNumber(result.balancedness_before)} → predicted ${formatNumber(result.balancedness_predicted)}.`;
  }
  if (result.status === "no_load") return "Nothing to plan on yet: send some requests first.";
  if (result.status === "busy") return "A rebalance is still moving experts.";
  return `Answer: ${result.status}${result.reason ? ` (${result.reason})` : ""}.`;
}

// ---------------------------------------------------------------- panel 8: follow one token

async function onFollowSubmit(event) {
  event.preventDefault();
  const button = $("follow-button");
  $("follow-error").textContent = "";
  button.disabled = true;
  try {
    const body = { prompt: $("follow-prompt").value, max_tokens: Number($("follow-max").value) };
    view.routes = await api("/dashboard/route", { method: "POST", timeoutMs: 120000,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    view.selectedToken = view.routes.tokens.findIndex((t) => t.generated);
    renderRoutes();
  } catch (error) {
    if (error instanceof AuthNeeded) askForKey();
    $("follow-error").textContent = error instanceof AuthNeeded ? "API key needed" : error.message;
  } finally {
    button.disabled = false;
  }
}

function renderRoutes() {
  const routes = view.routes;
  $("follow-result").hidden = false;
  const chips = routes.tokens.map((token, i) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = `token ${token.generated ? "generated" : "prompt"}${i === view.selectedToken ? " selected" : ""}`;
    chip.textContent = tokenLabel(token);
    chip.title = `position ${token.position} · token id ${token.token_id}`;
    chip.addEventListener("click", () => { view.selectedToken = i; renderRoutes(); });
    return chip;
  });
  $("follow-tokens").replaceChildren(...chips);
  $("follow-completion").textContent = routes.completion;
  renderRouteTable(routes, routes.tokens[Math.max(0, view.selectedToken)]);
}

// The token's text with spaces and newlines made visible; its vocabulary entry when the text is
// empty (a special token) or not a whole character (one byte of a longer UTF-8 sequence).
function tokenLabel(token) {
  if (!token.text || token.text.includes("\ufffd")) return `⟨${token.piece ?? token.token_id}⟩`;
  return token.text.replace(/\n/g, "⏎").replace(/ /g, "·");
}

function renderRouteTable(routes, token) {
  $("follow-title").textContent = `Token ${tokenLabel(token)} (id ${token.token_id}, position ${token.position}, `
    + `${token.generated ? "generated" : "prompt"}): its route through all ${token.layers.length} layers`;
  const k = token.layers[0]?.picks.length || 0;
  const head = document.createElement("tr");
  for (const title of ["layer", "router", ...Array.from({ length: k }, (_, i) => `pick ${i + 1}: expert · weight → slot (rank)`)]) {
    const th = document.createElement("th");
    th.textContent = title;
    head.append(th);
  }
  $("follow-table").querySelector("thead").replaceChildren(head);
  $("follow-table").querySelector("tbody").replaceChildren(...token.layers.map((layer) => routeRow(layer, routes.num_ranks)));
}

function routeRow(layer, numRanks) {
  const tr = document.createElement("tr");
  tr.append(cell(`${layer.layer}`), cell(layer.router === "hash" ? "hash (token id)" : "score (top-k)"));
  for (const pick of layer.picks) {
    const td = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "pick";
    badge.textContent = `expert ${pick.expert} · ${pick.weight.toFixed(3)} → slot ${pick.slot} (rank ${pick.rank})`;
    badge.style.background = rankColor(pick.rank, numRanks);
    td.append(badge);
    tr.append(td);
  }
  return tr;
}

// ---------------------------------------------------------------- hover and start-up

function onPointerMove(event) {
  const tooltip = $("tooltip");
  const hover = view.hover[event.target.id];
  const rect = event.target.getBoundingClientRect();
  const hit = hover && draw.cellAt(hover.geometry, event.clientX - rect.left, event.clientY - rect.top);
  if (!hit) {
    tooltip.hidden = true;
    return;
  }
  tooltip.textContent = hover.describe(hit.row, hit.col);
  tooltip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 330)}px`;
  tooltip.style.top = `${event.clientY + 14}px`;
  tooltip.hidden = false;
}

function redrawOnResize() {
  let pending = null;
  window.addEventListener("resize", () => {
    clearTimeout(pending);
    pending = setTimeout(() => view.state && render(view.state), 150);
  });
}

function start() {
  $("key-form").addEventListener("submit", onKeySubmit);
  $("rebalance-button").addEventListener("click", onRebalanceClick);
  $("follow-form").addEventListener("submit", onFollowSubmit);
  for (const canvas of document.querySelectorAll("canvas")) {
    canvas.addEventListener("mousemove", onPointerMove);
    canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  }
  redrawOnResize();
  poll();
}

start();
