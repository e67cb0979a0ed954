"""Open a report.html in headless Chromium: screenshots of its top and its error gallery, and what it asked for.

    python benchmarks/report_screenshots.py runs/demo/eval/report.html --out docs/

writes ``report-top.png`` (the first screen: provenance and headline numbers) and
``report-errors.png`` (the misclassified-images gallery) into ``--out``, and prints the page's
console errors and every request it made. It exits 1 when the page logged an error or asked for
anything but itself and inline ``data:`` pictures (report.html must be self-contained), 2 when
Chromium is missing.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so nothing but the Debian
``chromium`` package is needed: no driver, no browser download, no port opened.
tests/test_report_browser.py uses ``open_page`` from here.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
TIMEOUT_S = 60.0


def find_chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM``, else the Debian package's, else one on PATH."""
    env = os.environ.get("CHROMIUM")
    for candidate in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@dataclass
class PageVisit:
    """What a page did while it loaded: requests, console errors, and screenshots taken."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    screenshots: dict[str, bytes] = field(default_factory=dict)

    def foreign_requests(self, page_url: str) -> list[str]:
        """Requests for anything but the page itself and ``data:`` URIs."""
        return [u for u in self.requests if u != page_url and not u.startswith("data:")]


class DevTools:
    """A Chromium child driven over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, width: int, height: int):
        self.profile = tempfile.mkdtemp(prefix="hiercls-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Above 10, so the dup2 onto 3 and 4 in the child cannot clobber one another.
        high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def on_fds_3_and_4() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [
            binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
            # Sandboxing needs user namespaces a container (or root) often lacks; the page is our own file.
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
            f"--window-size={width},{height}", "about:blank",
        ]
        self.process = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=on_fds_3_and_4,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(high_r)
        os.close(high_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._receive(deadline - time.monotonic())
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_child], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self._stderr_tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _stderr_tail(self) -> str:
        try:
            self.process.wait(timeout=5)
            return (self.process.stderr.read() or b"").decode(errors="replace")[-2000:]
        except Exception:
            return "(no stderr)"

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.process.stderr:
            self.process.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors (a blocked load, a CSP violation)."""
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + str(params.get("exceptionDetails", {}).get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    return out


_RECT = ("(() => {{ const e = document.getElementById({id!r}); if (!e) return null; const r = e.getBoundingClientRect();"
         " return {{x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height}}; }})()")


def open_page(path: str | Path, *, binary: str | None = None, width: int = 1280, height: int = 900,
              shots: dict[str, str | None] | None = None, max_shot_height: int = 1100) -> PageVisit:
    """Load ``path`` in headless Chromium; screenshots by name: ``None`` = the first screen,
    an element id = that element (its first ``max_shot_height`` pixels)."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("Chromium is not installed (Debian: apt-get install chromium)")
    url = Path(path).resolve().as_uri()
    browser = DevTools(binary, width, height)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")
        time.sleep(0.3)  # late console messages
        visit = PageVisit()
        for name, element in (shots or {"top": None}).items():
            params: dict[str, Any] = {"format": "png"}
            if element:
                rect = browser.send("Runtime.evaluate", {"expression": _RECT.format(id=element), "returnByValue": True},
                                    session=session)["result"].get("value")
                if not rect:
                    raise ValueError(f"{path}: no element with id {element!r} to photograph")
                params.update(captureBeyondViewport=True, clip={
                    "x": rect["x"], "y": rect["y"], "width": rect["width"],
                    "height": min(rect["height"], max_shot_height), "scale": 1})
            visit.screenshots[name] = base64.b64decode(
                browser.send("Page.captureScreenshot", params, session=session)["data"])
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush pending events
        events = [e for e in browser.events if e.get("sessionId") in (None, session)]
        visit.requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
        visit.errors = _errors(events)
        return visit
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", help="report.html to open")
    parser.add_argument("--out", default=".", help="folder for report-top.png and report-errors.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("Chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    visit = open_page(args.report, width=args.width, height=args.height,
                      shots={"report-top": None, "report-errors": "errors"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in visit.screenshots.items():
        (out / f"{name}.png").write_bytes(png)
        print(f"wrote {out / f'{name}.png'} ({len(png)} bytes)")
    page = Path(args.report).resolve().as_uri()
    foreign = visit.foreign_requests(page)
    print(f"{len(visit.requests)} request(s): the page and {len(visit.requests) - len(foreign) - 1} data: URI(s); "
          f"{len(foreign)} other")
    for line in foreign + visit.errors:
        print(f"  {line}")
    return 1 if foreign or visit.errors else 0


if __name__ == "__main__":
    sys.exit(main())
