"""Start the Streamlit demo, chat once in headless Chromium, and save a PNG screenshot.

    python scripts/screenshot_web_demo.py [--model DIR] [--out web_demo.png] [--prompt TEXT]

Without ``--model`` a tiny random checkpoint is written to a temp folder (the reply is noise, but
the page, the streaming and the layout are real). Chromium (Debian's ``chromium`` package) is
driven over the DevTools protocol: type the prompt into the chat box, press Enter, wait for the
assistant's message, capture. Everything stays on 127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

from common.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--window-size=1400,900"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout:.0f}s") from None
            time.sleep(0.3)


def tiny_checkpoint(folder: Path) -> Path:
    import torch

    from model.config import MiniMindConfig
    from model.io import save_pretrained
    from model.model import MiniMindLM

    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    with torch.no_grad():  # varied (if meaningless) text instead of blank lines
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return save_pretrained(model, folder / "tiny-random")


class DevTools:
    """The few Chrome DevTools Protocol calls this script needs."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def wait_js(self, expression: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.25)


def shoot(cdp: DevTools, app_port: int, args: argparse.Namespace) -> None:
    """Open the app, send one chat message, wait for the full reply, save the PNG."""
    cdp.call("Page.enable")
    cdp.call("Page.navigate", url=f"http://127.0.0.1:{app_port}/")
    box = 'document.querySelector("[data-testid=stChatInputTextArea]")'
    cdp.wait_js(f"!!{box}", 60, "the chat input")
    if args.thinking:
        # The toggle is the sidebar's only checkbox input.
        cdp.js('document.querySelector("[data-testid=stSidebar] input[type=checkbox]").click()')
        cdp.wait_js('document.querySelector("[data-testid=stSidebar] input[type=checkbox]")'
                    '.checked', 10, "the thinking toggle")
        time.sleep(1.0)
    cdp.js(f"{box}.focus()")
    cdp.call("Input.insertText", text=args.prompt)
    for kind in ("keyDown", "keyUp"):
        cdp.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                 windowsVirtualKeyCode=13, text="\r" if kind == "keyDown" else "")
    cdp.wait_js('document.querySelectorAll("[data-testid=stChatMessage]").length >= 2',
                60, "the assistant's reply")
    # Done = the reply has text, no streaming cursor, and the header's "Stop" button (shown
    # while the script runs) is gone.
    cdp.wait_js('(() => { const m = [...document.querySelectorAll('
                '"[data-testid=stChatMessage]")].pop();'
                ' const running = [...document.querySelectorAll("button")]'
                '.some(b => b.innerText.trim() === "Stop");'
                ' return m && m.innerText.trim() && !m.innerText.includes("\u258c")'
                ' && !running; })()', 120, "the reply to finish")
    time.sleep(1.0)
    shot = cdp.call("Page.captureScreenshot", format="png")
    out = Path(args.out)
    out.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="web_demo.png")
    ap.add_argument("--prompt", default="Hello! What can you do?")
    ap.add_argument("--thinking", action="store_true", help="switch the thinking toggle on")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    if chrome is None:
        raise UserError("chromium not found (Debian: apt-get install -y chromium)")

    work = Path(tempfile.mkdtemp(prefix="web_demo_shot_"))
    model_dir = Path(args.model) if args.model else tiny_checkpoint(work)
    app_port, cdp_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "scripts" / "web_demo.py"),
             "--server.headless", "true", "--server.address", "127.0.0.1",
             "--server.port", str(app_port), "--browser.gatherUsageStats", "false",
             "--client.toolbarMode", "viewer",
             "--", "--model", str(model_dir), "--max-new-tokens", str(args.max_new_tokens)],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{app_port}/_stcore/health", 60)
        procs.append(subprocess.Popen(
            [chrome, *CHROME_FLAGS, f"--user-data-dir={work / 'chrome-profile'}",
             f"--remote-debugging-port={cdp_port}", "--remote-debugging-address=127.0.0.1",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{cdp_port}/json/version", 30)
        pages = json.loads(wait_http(f"http://127.0.0.1:{cdp_port}/json/list", 10))
        page = next(p for p in pages if p["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=64 << 20) as ws:
            shoot(DevTools(ws), app_port, args)
    finally:
        for p in reversed(procs):  # only what this script started
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
