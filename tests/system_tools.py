"""Programs the dashboard's tests need besides Python: a real headless Chromium and node.

Playwright's own browser download needs hosts CI cannot reach, so the browser test drives Debian's
`chromium-headless-shell` through Playwright's `executable_path`; the page's JavaScript helpers are
unit-tested with node's built-in runner. When a program is missing and we are root with apt-get (CI,
a fresh Debian-like machine), it is installed here, so the README's one test command sets everything
up. Otherwise `ToolUnavailable` says why, and the caller decides: under CI=true it fails, never skips.
"""
from __future__ import annotations

import os
import shutil
import subprocess

CHROMIUM_PACKAGE = "chromium-headless-shell"
CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser")
# Root in a container has no user-namespace sandbox; the rest keeps a test run quiet and offline.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio"]


class ToolUnavailable(RuntimeError):
    """A program is missing and cannot be installed here."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def apt_install(package: str) -> None:
    """apt-get update + install, as root only."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolUnavailable(f"{package} is missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise ToolUnavailable(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def find_program(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def installed_program(names: tuple[str, ...], package: str) -> str:
    """The first of `names` on PATH, installing `package` first when none is."""
    path = find_program(names)
    if path is None:
        apt_install(package)
        path = find_program(names)
    if path is None:
        raise ToolUnavailable(f"{package} installed, but none of {', '.join(names)} is on PATH")
    return path


def chromium_path() -> str:
    return installed_program(CHROMIUM_NAMES, CHROMIUM_PACKAGE)


def node_path() -> str:
    return installed_program(("node", "nodejs"), "nodejs")
