"""Headless Chromium for the UI tests: Debian's `chromium` (``./dev`` installs it when it is missing) driven by
Playwright with that executable; Playwright's own browser download is never used (it cannot be fetched here)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ONEPATH_CHROMIUM", "/usr/bin/chromium")
# without the background-networking flags Chromium's own update and sync calls meet a closed network and
# the page's own connections are refused with them
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def artifacts_dir() -> Path:
    """Where the UI tests keep their full-page screenshots: ``$ONEPATH_UI_ARTIFACTS``, else
    ``<repo>/test-artifacts/ui`` (git-ignored)."""
    return Path(os.environ.get("ONEPATH_UI_ARTIFACTS") or ROOT / "test-artifacts" / "ui")


@contextmanager
def chromium_page(base_url: str) -> Iterator["object"]:
    """A Playwright page in a fresh headless Chromium (its own user-data dir, removed after), on ``base_url``."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `apt-get install chromium` (./dev does it as root)"
    profile = tempfile.mkdtemp(prefix="onepath-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                        headless=True, base_url=base_url,
                                                        viewport={"width": 1600, "height": 1000})
            try:
                yield ctx.pages[0] if ctx.pages else ctx.new_page()
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
