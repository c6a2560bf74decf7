"""Screenshots of an `emfm view` viewer (emfm.view) in a headless Chromium."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emfm.errors import UserError
from emfm.view import PANEL_PX

BROWSERS = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chromium-headless-shell",
)


def find_browser() -> str | None:
    """A Chromium / Chrome executable on PATH (None: none installed)."""
    import shutil

    return next((exe for exe in map(shutil.which, BROWSERS) if exe), None)


def _end_group(proc) -> None:
    import os
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:
                try:  # children may outlive the leader for a moment
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        except subprocess.TimeoutExpired:
            continue


def screenshot(
    viewer: Any,
    out_png: str | Path,
    *,
    browser: str | None = None,
    size: tuple[int, int] = (1024, 768),
    timeout_s: float = 60.0,
) -> Path:
    """Render `viewer` in a headless Chromium and save what it shows, once every visible chunk has
    loaded, as a PNG (the browser draws it with WebGL in software, SwiftShader). Raises UserError
    when no browser is found and TimeoutError when the page does not deliver a screenshot within
    `timeout_s`."""
    import subprocess
    import tempfile
    import threading

    exe = browser or find_browser()
    if exe is None:
        raise UserError(f"no Chromium or Chrome found on PATH (looked for {', '.join(BROWSERS)})")
    done, shots = threading.Event(), []
    with tempfile.TemporaryDirectory(prefix="emfm_view_browser_") as profile:
        proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader",
                f"--window-size={size[0]},{size[1]}",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                str(viewer),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        prior = viewer.config_state.state
        try:
            with viewer.config_state.txn() as c:  # the canvas alone, at exactly `size`
                c.show_ui_controls = False
                c.show_panel_borders = False
                c.viewer_size = list(size)
            with viewer.txn() as s:  # the same framing as the default window gives
                s.cross_section_scale = s.cross_section_scale * PANEL_PX / size[0]
            viewer.async_screenshot(lambda shot: (shots.append(shot), done.set()))
            if not done.wait(timeout_s):
                raise TimeoutError(f"{exe} gave no screenshot of {viewer} within {timeout_s:.0f} s")
        finally:
            viewer.config_state.set_state(prior)
            with viewer.txn() as s:
                s.cross_section_scale = s.cross_section_scale * size[0] / PANEL_PX
            _end_group(proc)  # the browser and every helper process it started
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(shots[0].screenshot.image)
    return out
