"""A real browser for the ops console's e2e test: Debian's headless Chromium driven by Playwright
for Python. Nothing is downloaded (never `playwright install`): the browser is the machine's
/usr/bin/chromium (.ci/setup-machine installs it), or ORDERPIPE_TEST_CHROMIUM.

Without the browser or Playwright the test fails under CI=true, saying what is missing, and
skips with that reason elsewhere (as the PostgreSQL tests do).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import in_ci

CHROMIUM = os.environ.get("ORDERPIPE_TEST_CHROMIUM") or "/usr/bin/chromium"
# Headless in a container without GPU or user namespaces, and quiet on a closed network: without
# the background-networking flags Chromium keeps calling Google's services, refused here.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
# Where the screenshots go: the README's images with ORDERPIPE_CONSOLE_SCREENSHOTS=docs/console (to
# refresh them), else a folder of the run's own, so a test run never changes tracked files.
SCREENSHOTS = Path(os.environ.get("ORDERPIPE_CONSOLE_SCREENSHOTS")
                   or Path(tempfile.gettempdir()) / f"orderpipe-console-screenshots-{os.getpid()}")


def unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def chromium_path() -> str:
    found = shutil.which(CHROMIUM) if os.sep not in CHROMIUM else (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if not found:
        unavailable(f"no Chromium at {CHROMIUM}: install Debian's (`apt-get install chromium`, as .ci/setup-machine "
                    "does) or set ORDERPIPE_TEST_CHROMIUM; the browser test never downloads one")
    return found


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (playwright.sync_api.Browser), closed afterwards with its driver."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("Playwright for Python is not installed: pip install -e '.[test]'")
    executable = chromium_path()
    try:
        playwright = sync_playwright().start()  # Playwright's driver (node), shipped in the wheel
    except Exception as exc:  # noqa: BLE001 - the driver missing or not starting
        unavailable(f"Playwright's driver does not start ({type(exc).__name__}: {exc}): reinstall playwright")
    try:
        try:
            browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS,
                                                 timeout=60_000)
        except Error as exc:
            unavailable(f"Chromium at {executable} does not start under Playwright: {str(exc)[:500]}")
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


MAX_SCREENSHOT_HEIGHT = 2000  # a long page (every group's partitions) is cut here: the README's images stay small


def screenshot(page, name: str) -> Path:
    """The whole page, up to MAX_SCREENSHOT_HEIGHT pixels, as SCREENSHOTS/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    height = min(page.evaluate("document.documentElement.scrollHeight"), MAX_SCREENSHOT_HEIGHT)
    page.screenshot(path=str(path), full_page=True,
                    clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": max(height, VIEWPORT["height"])})
    return path
