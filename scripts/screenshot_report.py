"""Screenshot the first screen of a report with headless Chromium (how docs/report-first-screen.png is made).

    .venv/bin/twinarm report tiny --out /tmp/report
    .venv/bin/python scripts/screenshot_report.py /tmp/report/report.html docs/report-first-screen.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from headless_chromium import chromium  # scripts/ is on sys.path when a script runs


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 900) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # so a stale file never passes for a new screenshot
    done = chromium(page.resolve().as_uri(), f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"chromium failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
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
