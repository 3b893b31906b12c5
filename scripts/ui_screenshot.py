"""The README's screenshot: the first screen of `vit-search ui` on the quickstart's store, as headless
Chromium renders it.

    cd DIR_OF_THE_QUICKSTART_RUN && python /path/to/scripts/ui_screenshot.py [SPEC] [--out PNG]

Needs Debian's `chromium` (apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def browser() -> str:
    """The Chromium executable; exits with a one-line error where there is none."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        sys.exit("error: no chromium on PATH; install it with: apt-get install -y chromium")
    return found


def chromium_args(profile: str) -> list[str]:
    """Headless Chromium that lets MLflow's app run before the page is captured."""
    return [browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
            "--hide-scrollbars", "--virtual-time-budget=60000"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(REPO / "experiments" / "digits.yaml"))
    parser.add_argument("--out", default=str(REPO / "docs" / "ui-first-screen.png"))
    args = parser.parse_args()
    browser()  # before the server: a missing browser is said at once
    ui = subprocess.Popen([sys.executable, "-m", "vit_search", "ui", args.spec, "--port", "0"],
                          stdout=subprocess.PIPE, text=True)
    try:
        address = next((line.split(": ", 1)[1].split()[0] for line in ui.stdout if line.startswith("MLflow UI for ")),
                       None)
        if address is None:
            sys.exit(f"error: vit-search ui did not start (exit {ui.wait()})")
        print(address)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([*chromium_args(profile), f"--screenshot={Path(args.out).resolve()}", "--window-size=1400,900",
                            address], check=True, capture_output=True, timeout=180)
        print(f"wrote {args.out}")
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
