"""Debian's Chromium, headless, for the screenshot scripts (apt-get install chromium)."""
from __future__ import annotations

import shutil
import subprocess
import sys

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium(url: str, *flags: str, budget_ms: int | None = None) -> subprocess.CompletedProcess:
    """Run headless Chromium on url. budget_ms (--virtual-time-budget) lets a single-page app render first."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        sys.exit(f"no headless browser found (looked for {', '.join(BROWSERS)}); apt-get install chromium")
    budget = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    # --no-sandbox: root in a container has no user namespaces for Chromium's sandbox
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *budget,
                           *flags, url], capture_output=True, text=True, timeout=180)
