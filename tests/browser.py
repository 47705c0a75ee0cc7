"""Drive Debian's headless Chromium over the DevTools protocol: load a page, wait until a JavaScript
condition holds (a Streamlit page renders after its websocket session runs the script, so a plain
`--screenshot` would catch an empty page), then save a PNG screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process has not ended within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def screenshot(chromium: str, url: str, out: Path, ready_js: str, profile: Path, width: int = 1400,
               height: int = 2000, timeout: float = 180, settle: float = 3.0) -> bool:
    """Save a screenshot of `url` once `ready_js` is true (or at `timeout`); True if it became ready."""
    from websockets.sync.client import connect

    port = free_port()
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                             f"--window-size={width},{height}", f"--remote-debugging-port={port}",
                             "--remote-allow-origins=*", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                page = next(t for t in _get_json(f"http://127.0.0.1:{port}/json") if t.get("type") == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    raise TimeoutError("Chromium's DevTools endpoint did not come up") from None
                time.sleep(0.5)
        ids = itertools.count(1)
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            def call(method: str, **params):
                msg_id = next(ids)
                ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg.get("id") == msg_id:
                        return msg.get("result", {})

            call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            ready = False
            while time.monotonic() < deadline:
                value = call("Runtime.evaluate", expression=f"Boolean({ready_js})", returnByValue=True)
                if value.get("result", {}).get("value") is True:
                    ready = True
                    break
                time.sleep(1)
            time.sleep(settle)  # let charts finish drawing
            shot = call("Page.captureScreenshot", format="png")
        Path(out).write_bytes(base64.b64decode(shot["data"]))
        return ready
    finally:
        stop(proc, timeout=20)
