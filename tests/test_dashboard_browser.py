"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against a real
server (`python serve.py --eplb ...` on a free loopback port). Traffic, a rebalance forced from the
page's own button, then the page must show what /eplb/state says, follow a token, and log no errors.
It writes the README's screenshot, docs/dashboard.png.

The browser comes from apt (tests/system_tools.py installs it when missing). Under CI=true this test
never skips; elsewhere it skips only when the browser cannot be installed (no root or no apt-get).
"""
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from system_tools import LAUNCH_ARGS, ToolUnavailable, chromium_path, in_ci
from test_serve import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
KEY = "browser-key"
MODEL = "dsv4-tiny"
REBALANCE_EVERY = 20
WAIT_MS = 60_000     # generous: other test runs share the two cores


@pytest.fixture(scope="module")
def chromium():
    try:
        return chromium_path()
    except ToolUnavailable as error:
        if in_ci():
            pytest.fail(f"CI must run the browser test: {error}")
        pytest.skip(str(error))


class DashboardServer:
    """`python serve.py --preset tiny --eplb ...` on a free loopback port, one torch thread: on two
    shared cores OpenMP's spinning threads make a step 5-50x slower when other tests run alongside."""

    def __init__(self, *flags: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "serve.py", "--preset", "tiny", "--port", self.url.rsplit(":", 1)[1],
             "--log-level", "warning", *flags], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_healthy(self.proc, self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


@pytest.fixture(scope="module")
def server():
    s = DashboardServer("--eplb", "--ep-size", "4", "--ep-num-redundant-experts", "4",
                        "--eplb-rebalance-num-iterations", str(REBALANCE_EVERY), "--api-key", KEY, "--max-seq-len", "128")
    yield s
    s.stop()


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def send_traffic(url: str, num_requests: int, max_tokens: int) -> None:
    """Concurrent completions (threads: Playwright's sync API owns this thread's event loop); returns
    when all are done, so the engine is idle and its state holds still."""
    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"request {i}: the quick brown fox " * (1 + i % 3),
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=300)
        assert answer.status_code == 200, answer.text

    with ThreadPoolExecutor(num_requests) as pool:
        list(pool.map(one, range(num_requests)))


def eplb_state(url: str) -> dict:
    return httpx.get(url + "/eplb/state", headers=auth(), timeout=30).json()


def console_problems(messages: list[str]) -> list[str]:
    """Errors and warnings the page logged, except the one expected 401: the page's first poll is how it
    learns that this server wants a key (Chromium logs every non-2xx resource load)."""
    expected = "status of 401 (Unauthorized)"
    problems = [m for m in messages if m.startswith(("error", "warning", "pageerror"))]
    return [m for m in problems if expected not in m]


def wait_until_page_shows(page, step: int) -> None:
    """Until the page has drawn the state of engine step `step`. Polled from here: Playwright's own
    wait_for_function evaluates a string in the page, which the page's CSP (no 'unsafe-eval') forbids."""
    deadline = time.monotonic() + WAIT_MS / 1e3
    while page.evaluate("() => document.body.dataset.renderedStep") != str(step):
        assert time.monotonic() < deadline, f"the page never showed step {step}"
        time.sleep(0.1)


def test_dashboard_in_a_real_browser(chromium, server):
    send_traffic(server.url, num_requests=8, max_tokens=24)          # > 20 steps: one periodic rebalance
    messages: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
        page.goto(server.url + "/dashboard")
        enter_the_key(page)
        wait_until_page_shows(page, eplb_state(server.url)["step"])
        force_a_rebalance_from_the_page(page)
        send_traffic(server.url, num_requests=6, max_tokens=REBALANCE_EVERY + 4)  # the move gets measured
        state = eplb_state(server.url)
        wait_until_page_shows(page, state["step"])
        check_page_matches_state(page, state)
        follow_a_token(page, state)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        check_released_sizes_render_fast(page)
        check_eplb_off_notice(page)
        browser.close()
    assert console_problems(messages) == []
    assert SCREENSHOT.stat().st_size > 20_000


def enter_the_key(page) -> None:
    page.wait_for_selector("#key-panel:not([hidden])", timeout=WAIT_MS)
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#key-panel", state="hidden", timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('dsv4-dashboard-api-key')") == KEY


def force_a_rebalance_from_the_page(page) -> None:
    page.click("#rebalance-button")
    page.wait_for_selector("#rebalance-answer:not([hidden])", timeout=WAIT_MS)
    assert page.text_content("#rebalance-answer").startswith("Started: balancedness")


def check_page_matches_state(page, state: dict) -> None:
    """The drawn values are the server's: layer x rank cells, stragglers, per-rank bars, expert load,
    the rebalance count and table, the current balancedness, the slots the last rebalance changed."""
    heat = page.locator("#heat-rank")
    assert heat.evaluate("c => JSON.parse(c.dataset.values)") == state["rank_load"]
    stragglers = heat.evaluate("c => JSON.parse(c.dataset.stragglers)")
    assert stragglers == [row.index(max(row)) for row in state["rank_load"]]
    bars = page.locator("#chart-rank-tokens").evaluate("c => JSON.parse(c.dataset.values)")
    assert bars == state["ranks"]["tokens_window"]
    assert page.locator("#heat-expert").evaluate("c => JSON.parse(c.dataset.values)") == state["logical_load"]
    assert page.text_content("#stat-balancedness") == f"{state['balancedness']:.3f}"
    records = state["rebalances"]
    assert state["counters"]["rebalances_total"] >= 2          # the periodic one and the forced one
    assert page.text_content("#stat-rebalances") == str(state["counters"]["rebalances_total"])
    rows = page.locator("#rebalance-table tbody tr")
    assert rows.count() == len(records)
    measured = [r for r in records if r["balancedness_measured"] is not None]
    assert measured, "the traffic after the forced rebalance should have measured it"
    row = rows.nth(len(records) - 1 - records.index(measured[-1]))          # the table is newest first
    cells = [row.locator("td").nth(i).text_content() for i in range(5)]
    assert cells[0].replace("\u2009", "") == str(measured[-1]["step"])     # thin-space thousands
    assert cells[2:] == [f"{measured[-1][k]:.3f}" for k in ("balancedness_before", "balancedness_predicted",
                                                            "balancedness_measured")]
    outlined = int(page.locator("#heat-placement").evaluate("c => c.dataset.changed"))
    latest_move = [r for r in records if r["slots_changed"] > 0][-1]  # later records may be skips (#14)
    assert outlined == sum(map(len, state["changed_slots"])) == latest_move["slots_changed"] > 0


def follow_a_token(page, state: dict) -> None:
    page.fill("#follow-prompt", "The quick brown fox")
    page.fill("#follow-max", "4")
    page.click("#follow-button")
    page.wait_for_selector("#follow-result:not([hidden])", timeout=WAIT_MS)
    rows = page.locator("#follow-table tbody tr")
    assert rows.count() == state["num_layers"]
    first_pick = rows.first.locator(".pick").first.text_content()
    expert, slot, rank = parse_pick(first_pick)
    slots_per_rank = state["num_physical"] // state["num_ranks"]
    assert state["phy2log"][0][slot] == expert and rank == slot // slots_per_rank
    assert page.locator("#follow-tokens .token.generated").count() == 4


def parse_pick(label: str) -> tuple[int, int, int]:
    """'expert 5 · 0.361 → slot 1 (rank 0)' -> (5, 1, 0)."""
    words = label.replace("(", " ").replace(")", " ").split()
    return int(words[1]), int(words[words.index("slot") + 1]), int(words[words.index("rank") + 1])


def released_size_state(num_layers=43, num_experts=256, num_ranks=32, num_redundant=32) -> dict:
    """An /eplb/state of the released size (DeepSeek-V4 Flash-like), with torchrun's per-rank seconds."""
    rng = random.Random(0)
    num_physical = num_experts + num_redundant
    phy2log = [rng.sample(range(num_experts), num_experts) + [rng.randrange(num_experts) for _ in range(num_redundant)]
               for _ in range(num_layers)]
    rank_load = [[rng.randrange(5_000, 15_000) for _ in range(num_ranks)] for _ in range(num_layers)]
    per_layer = [sum(row) / len(row) / max(row) for row in rank_load]
    return {
        "enabled": True, "num_layers": num_layers, "num_experts": num_experts, "num_physical": num_physical,
        "num_ranks": num_ranks, "step": 5000, "window_steps": 1000,
        "config": {"num_ranks": num_ranks, "rebalance_num_iterations": 1000, "window": 1000, "algorithm": "global"},
        "phy2log": phy2log, "logcnt": [[row.count(e) for e in range(num_experts)] for row in phy2log],
        "logical_load": [[rng.randrange(10, 1000) for _ in range(num_experts)] for _ in range(num_layers)],
        "rank_load": rank_load, "balancedness_per_layer": per_layer, "balancedness": sum(per_layer) / num_layers,
        "balancedness_history": [[step, 0.7] for step in range(100, 5001, 100)],
        "layer_balancedness_history": [[step, per_layer] for step in range(100, 5001, 100)],
        "changed_slots": [rng.sample(range(num_physical), 20) for _ in range(num_layers)],
        "rebalance_in_progress": {"layers_left": 12}, "rebalances": [],
        "counters": {"rebalances_total": 0, "rebalances_skipped_total": 0, "bytes_moved_total": 0, "slots_changed_total": 0},
        "ranks": {"tokens_window": [sum(row[g] for row in rank_load) for g in range(num_ranks)],
                  "moe_seconds_last_step": [rng.uniform(0.001, 0.002) for _ in range(num_ranks)]},
    }


def check_released_sizes_render_fast(page) -> None:
    """43 layers x 256 experts x 32 ranks (288 slots): the whole page redraws well within a poll period."""
    state = released_size_state()
    page.route("**/eplb/state", lambda route: route.fulfill(json=state))
    wait_until_page_shows(page, state["step"])
    assert page.locator("#heat-rank").evaluate("c => JSON.parse(c.dataset.values)") == state["rank_load"]
    assert page.locator("#moe-seconds-box").is_visible()
    assert page.locator("#rebalance-table tbody tr").first.text_content().startswith("nowmoving: 12 layers left")
    render_ms = float(page.evaluate("() => document.body.dataset.renderMs"))
    assert render_ms < 1000, f"one redraw at released sizes took {render_ms} ms"
    page.unroute("**/eplb/state")


def check_eplb_off_notice(page) -> None:
    """Without --eplb /eplb/state answers {"enabled": false}: the page says so and names the flags."""
    page.route("**/eplb/state", lambda route: route.fulfill(json={"enabled": False}))
    page.wait_for_selector("#eplb-off:not([hidden])", timeout=WAIT_MS)
    notice = page.text_content("#eplb-off")
    assert "EPLB is off" in notice and "--eplb" in notice and "--ep-size" in notice
    assert page.locator("#panel-layer-rank").is_hidden() and page.locator("#panel-follow").is_visible()
