"""Screenshot the first screen of a report with headless Chromium (how docs/report-first-screen.png is made).

    .venv/bin/twinarm report tiny --out /tmp/report
    .venv/bin/python scripts/screenshot_report.py /tmp/report/report.html docs/report-first-screen.png
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 900) -> Path:
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit(f"no headless browser found (looked for {', '.join(BROWSERS)}); install chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # so a stale file never passes for a new screenshot
    # --no-sandbox: root in a container has no user namespaces for Chromium's sandbox
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={png.resolve()}", f"--window-size={width},{height}",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"{browser} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path, help="report.html")
    parser.add_argument("png", type=Path, nargs="?", default=Path("docs/report-first-screen.png"))
    parser.add_argument("--size", default="1280,900", help="window WIDTH,HEIGHT in pixels")
    args = parser.parse_args()
    if not args.page.is_file():
        parser.error(f"{args.page}: no such file")
    width, height = (int(v) for v in args.size.split(","))
    print(screenshot(args.page, args.png, width, height))


if __name__ == "__main__":
    sys.exit(main())
