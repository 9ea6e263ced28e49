"""Render a beear report.html in headless Chromium and check it is whole and self-contained.

    python scripts/check_report_html.py runs/x/report.html /tmp/report.png [--min-images 4]

Two Chromium calls: one writes a screenshot (look at it), one dumps the DOM after rendering.
The DOM must contain the results table and at least `--min-images` <img> tags, every one with a
`data:image/png;base64,` source, and no element may load anything from the network. Prints one
line, "OK: ..." or "FAIL: ...", and exits 0 (OK), 1 (FAIL) or 2 (bad arguments, no Chromium).
Needs Debian's chromium (`apt-get install -y chromium`); another binary via --chromium.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium(binary: str, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run Chromium once with the fixed flags and a throw-away profile directory."""
    with tempfile.TemporaryDirectory(prefix="beear-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def check_dom(dom: str, *, min_images: int) -> list[str]:
    """Problems found in the rendered DOM (empty when it passes)."""
    problems = []
    if not re.search(r"<table\b", dom):
        problems.append("no <table> in the DOM")
    elif not re.search(r"<th[^>]*>\s*Triggered ASR\s*</th>", dom):
        problems.append("the table has no 'Triggered ASR' row")
    srcs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", dom)
    n_imgs = len(re.findall(r"<img\b", dom))
    embedded = [s for s in srcs if s.startswith("data:image/png;base64,")]
    if len(embedded) < min_images:
        problems.append(f"{len(embedded)} <img> with PNG data URIs, expected >= {min_images}")
    if len(embedded) != n_imgs:
        problems.append(f"{n_imgs - len(embedded)} <img> tags without a PNG data URI")
    external = re.findall(r"\b(?:src|href)=\"((?:https?:|//|file:)[^\"]*)\"", dom)
    if external:
        problems.append(f"external resources: {', '.join(sorted(set(external))[:3])}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report.html to check")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--min-images", type=int, default=1, help="embedded PNGs required")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per Chromium call")
    args = parser.parse_args(argv)

    if not args.html.is_file():
        print(f"FAIL: {args.html}: no such file")
        return 2
    if not Path(args.chromium).exists():
        print(f"FAIL: {args.chromium} not found (apt-get install -y chromium)")
        return 2
    url = args.html.resolve().as_uri()
    png = args.png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)

    try:
        shot = chromium(
            args.chromium,
            [f"--screenshot={png}", "--window-size=1200,2400", url],
            timeout=args.timeout,
        )
        dump = chromium(args.chromium, ["--dump-dom", url], timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        print(f"FAIL: chromium did not finish within {e.timeout:.0f} s")
        return 1

    problems = []
    if shot.returncode != 0:
        problems.append(f"screenshot call exited {shot.returncode}")
    if not png.is_file() or png.read_bytes()[:8] != PNG_SIGNATURE:
        problems.append("no screenshot PNG written")
    if dump.returncode != 0 or not dump.stdout.strip():
        problems.append(f"--dump-dom exited {dump.returncode} with {len(dump.stdout)} chars")
    else:
        problems += check_dom(dump.stdout, min_images=args.min_images)
    if problems:
        print(f"FAIL: {args.html}: " + "; ".join(problems))
        return 1
    n_imgs = len(re.findall(r"<img\b", dump.stdout))
    print(
        f"OK: {args.html} renders; table present, {n_imgs} embedded PNG images, "
        f"no external resources; screenshot {png} ({png.stat().st_size} bytes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
