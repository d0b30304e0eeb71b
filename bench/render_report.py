"""Render a cryoves QC report in a real browser (headless Chromium) to a PNG, to look at it.

    apt-get install chromium          # Debian package
    python bench/render_report.py OUTDIR/report.html -o docs/report_screenshot.png

Chromium runs with networking features off and a fresh profile: the report must show everything
with no network (all figures are embedded), which this also checks.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render(html: Path, png: Path, width: int = 1400, height: int = 4200, timeout: float = 120) -> Path:
    """Screenshot ``html`` (file URL) with headless Chromium into ``png``."""
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("Chromium not found: apt-get install chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png.resolve()}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
    if not png.exists() or png.stat().st_size < 10_000:
        raise RuntimeError(f"Chromium produced no usable screenshot at {png}")
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/report_screenshot.png"))
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=4200)
    args = ap.parse_args()
    try:
        out = render(args.html, args.output, args.width, args.height)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        sys.exit(str(exc))
    print(f"rendered {args.html} -> {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
