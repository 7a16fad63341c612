"""Render a tailtune report to full-page PNG screenshots with headless Chromium.

    python scripts/screenshot_report.py runs/demo/report.html --out-dir shots/
    python scripts/screenshot_report.py runs/demo            # builds report.html first

Chromium's ``--screenshot`` captures one window, so the page is rendered into a window taller
than any report, the blank space below the page is trimmed, and the result is cut into
slices of ``--slice`` pixels (``<stem>-01.png``, ...) that an image viewer shows at full size.
Also writes ``<stem>-full.png``. Installs Debian's ``chromium`` with apt-get when it is missing
and this runs as root. Chromium gets a fresh profile each time and no network features, so it
makes no requests of its own; a self-contained report needs none.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.geteuid() != 0:
        sys.exit("chromium is not installed: run `apt-get update && apt-get install -y chromium`")
    print("chromium is missing; installing it with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("chromium") or sys.exit("apt-get did not provide a chromium binary")


def screenshot(browser: str, html: Path, png: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tailtune-chromium-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not png.is_file():
        sys.exit(f"chromium failed ({done.returncode}):\n{done.stderr[-2000:]}")


def content_height(image) -> int:
    """Rows down to the last one that is not plain background."""
    import numpy as np

    pixels = np.asarray(image.convert("L"))
    rows = np.flatnonzero((pixels < 250).any(axis=1))
    return int(rows[-1]) + 1 if rows.size else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html, or a run directory to build it in")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: next to the report")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--slice", type=int, default=1600, help="height of each slice, pixels")
    parser.add_argument("--max-height", type=int, default=32000)
    args = parser.parse_args()

    from PIL import Image

    html = args.report
    if html.is_dir():
        from tailtune.report import build_report

        html = build_report(html)
    if not html.is_file():
        sys.exit(f"{html} does not exist")
    out_dir = args.out_dir or html.parent / "screenshots"
    out_dir.mkdir(parents=True, exist_ok=True)
    browser = find_chromium()

    # A window too short for the page leaves content touching its bottom edge: grow and retry.
    height = 8000
    while True:
        full = out_dir / f"{html.stem}-full.png"
        screenshot(browser, html, full, args.width, height)
        image = Image.open(full)
        used = content_height(image)
        if used < height - 40 or height >= args.max_height:
            break
        height = min(args.max_height, height * 2)
    image = image.crop((0, 0, image.width, min(image.height, used + 40)))
    image.save(full)
    for old in out_dir.glob(f"{html.stem}-[0-9][0-9].png"):
        old.unlink()
    paths = [full]
    for i, top in enumerate(range(0, image.height, args.slice), start=1):
        part = out_dir / f"{html.stem}-{i:02d}.png"
        image.crop((0, top, image.width, min(image.height, top + args.slice))).save(part)
        paths.append(part)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
