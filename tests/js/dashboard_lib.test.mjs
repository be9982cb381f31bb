// Unit tests of the dashboard's pure helpers: `node --test tests/js` (run by tests/test_dashboard.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  argmax, balancedness, balancednessColor, cellSize, changedSlotMask, clamp, countTrue, expertColor, formatCompact, formatCount,
  formatMiB, formatMs, formatNumber, interpolateStops, linearScale, loadRatioColor, niceTicks, normalizeRowsByMax,
  normalizeRowsByMean, rankColor, rankOfSlot, ratioToUnit, replicaColor, shareColor, textColorOn,
} from "../../static/dashboard_lib.js";

test("balancedness is mean over max, and an idle layer is balanced", () => {
  assert.equal(balancedness([10, 10, 10, 10]), 1);
  assert.equal(balancedness([0, 0, 0, 40]), 0.25);
  assert.equal(balancedness([0, 0]), 1);
});

test("argmax picks the first of equal maxima; clamp bounds", () => {
  assert.equal(argmax([1, 5, 5, 2]), 1);
  assert.equal(argmax([]), -1);
  assert.equal(clamp(5, 0, 1), 1);
  assert.equal(clamp(-1, 0, 1), 0);
});

test("rows normalise by their own mean and max; empty rows stay zero", () => {
  assert.deepEqual(normalizeRowsByMean([[1, 3], [0, 0]]), [[0.5, 1.5], [0, 0]]);
  assert.deepEqual(normalizeRowsByMax([[2, 4], [0, 0]]), [[0.5, 1], [0, 0]]);
});

test("linear scale maps the domain ends and a degenerate domain", () => {
  const y = linearScale(0, 1, 100, 0);
  assert.equal(y(0), 100);
  assert.equal(y(1), 0);
  assert.equal(y(0.25), 75);
  assert.equal(linearScale(3, 3, 7, 9)(3), 7);
});

test("nice ticks are round and cover the range", () => {
  assert.deepEqual(niceTicks(0, 1, 5), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  assert.deepEqual(niceTicks(0, 100, 4), [0, 50, 100]);
  assert.deepEqual(niceTicks(3, 3), [3]);
  for (const t of niceTicks(0.37, 0.93, 5)) assert.ok(t >= 0.37 && t <= 0.93);
});

test("colour stops interpolate and clamp", () => {
  assert.equal(interpolateStops(["#000000", "#ffffff"], 0), "rgb(0, 0, 0)");
  assert.equal(interpolateStops(["#000000", "#ffffff"], 0.5), "rgb(128, 128, 128)");
  assert.equal(interpolateStops(["#000000", "#ffffff"], 7), "rgb(255, 255, 255)");
  assert.equal(interpolateStops(["#000000", "#ffffff"], NaN), "rgb(0, 0, 0)");
});

test("a fair share is white, hotter is redder, colder is bluer", () => {
  assert.equal(ratioToUnit(1), 0.4);
  assert.equal(loadRatioColor(1), "rgb(247, 247, 247)");
  const [r, , b] = loadRatioColor(2).match(/\d+/g).map(Number);
  assert.ok(r > b);
  const [r0, , b0] = loadRatioColor(0.2).match(/\d+/g).map(Number);
  assert.ok(b0 > r0);
  assert.equal(loadRatioColor(99), loadRatioColor(2.5));
  assert.notEqual(shareColor(0), shareColor(1));
});

test("replica colours: one replica is white, more are green and saturate", () => {
  assert.equal(replicaColor(1), "#ffffff");
  assert.notEqual(replicaColor(2), "#ffffff");
  assert.equal(replicaColor(40), replicaColor(5));
});

test("experts get distinct hues; text contrast follows the background", () => {
  assert.notEqual(expertColor(0), expertColor(1));
  assert.equal(textColorOn("#ffffff"), "#111");
  assert.equal(textColorOn("rgb(20, 20, 60)"), "#fff");
  assert.equal(balancednessColor(0.95), "#1d7a3a");
  assert.equal(balancednessColor(0.5), "#b42318");
});

test("slots map to ranks in equal consecutive blocks", () => {
  assert.equal(rankOfSlot(0, 36, 4), 0);
  assert.equal(rankOfSlot(8, 36, 4), 0);
  assert.equal(rankOfSlot(9, 36, 4), 1);
  assert.equal(rankOfSlot(35, 36, 4), 3);
});

test("changed slots become a layer x slot mask", () => {
  const mask = changedSlotMask([[1], [], [0, 2]], 3);
  assert.deepEqual(mask, [[false, true, false], [false, false, false], [true, false, true]]);
  assert.equal(countTrue(mask), 3);
  assert.equal(changedSlotMask(undefined, 3), null);
  assert.equal(countTrue(null), 0);
});

test("cell sizes fit the width within bounds", () => {
  assert.equal(cellSize(1000, 10, 2, 40), 40);
  assert.equal(cellSize(1000, 256, 2, 40), 3);
  assert.equal(cellSize(100, 1000, 2, 40), 2);
});

test("formatting: missing values are dashes; units convert", () => {
  assert.equal(formatNumber(null), "–");
  assert.equal(formatNumber(0.91234), "0.912");
  assert.equal(formatMiB(2 ** 21), "2.0");
  assert.equal(formatMs(0.0123), "12.3");
  assert.equal(formatMs(undefined), "–");
  assert.equal(formatCount(1234567), "1\u2009234\u2009567");
});

test("rank colours differ between neighbouring ranks", () => {
  assert.notEqual(rankColor(0, 4), rankColor(1, 4));
  assert.notEqual(rankColor(0, 32), rankColor(1, 32));
});

test("compact numbers for axis ticks", () => {
  assert.equal(formatCompact(950), "950");
  assert.equal(formatCompact(12000), "12k");
  assert.equal(formatCompact(1500), "1.5k");
  assert.equal(formatCompact(400000), "400k");
  assert.equal(formatCompact(3400000), "3.4M");
  assert.equal(formatCompact(0.25), "0.25");
});
