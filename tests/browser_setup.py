"""A real headless Chromium for the browser tests, from the Debian packages.

Playwright's own browser download needs hosts CI cannot reach, so the tests drive Debian's
`chromium-headless-shell` through Playwright's `executable_path`. When the binary is missing and we
are root with apt-get (CI), it is installed here; otherwise the caller decides whether to fail
(CI=true: always) or skip.
"""
from __future__ import annotations

import os
import shutil
import subprocess

PACKAGE = "chromium-headless-shell"
CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser")
# Root in a container has no user namespace sandbox; the rest keeps a test run quiet and offline.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio"]


class BrowserUnavailable(RuntimeError):
    """No Chromium here and no way to install one."""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    # Debian's headless shell lives under /usr/lib/chromium; some images put no link on PATH.
    for path in ("/usr/lib/chromium/headless_shell", "/usr/lib/chromium/chrome-headless-shell"):
        if os.access(path, os.X_OK):
            return path
    return None


def install_chromium() -> None:
    """apt-get update + install (root only): the README's test command sets up a fresh machine."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BrowserUnavailable(f"{PACKAGE} is missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise BrowserUnavailable(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def chromium_path() -> str:
    """The Chromium binary, installed first when missing."""
    path = find_chromium()
    if path is None:
        install_chromium()
        path = find_chromium()
    if path is None:
        raise BrowserUnavailable(f"{PACKAGE} installed, but no chromium binary found on PATH")
    return path
