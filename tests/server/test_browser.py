"""The package in ComfyUI's web interface: headless Chromium against the session's real server.

Chromium is driven over the DevTools protocol (a small client on aiohttp, which ComfyUI already
requires) with real input events where an artist would use the mouse or keyboard. The tests look
for the HyCa nodes in the node search, load every example workflow from the template browser
(ComfyUI's "Extensions" section) and check that no node is missing, load a workflow saved with HyCa
Apply (Advanced)'s removed adaptive mode, and open a node's documentation from the node library.
Screenshots go to artifacts/browser/ (or $HYCA_TEST_ARTIFACTS).

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); skipped with that reason if none.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from harness.reference_model import SHIFT

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
ARTIFACTS = Path(os.environ.get("HYCA_TEST_ARTIFACTS", REPO / "artifacts")) / "browser"
NODES = {
    "HyCaCacheSpeedUp": "HyCa Apply (faster sampling)",
    "HyCaApply": "HyCa Apply (Advanced)",
    "HyCaCalibrate": "HyCa Calibrate",
    "HyCaSolverInspector": "HyCa Solver Inspector",
}
MISSING_NODES_TITLE = "This workflow has missing nodes"  # the frontend's (1.32) dialog title
FRONTEND_ONLY = {"MarkdownNote", "Note"}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Page:
    """One browser tab over the DevTools protocol: evaluate JavaScript, send input, take screenshots."""

    def __init__(self, debugger_url: str):
        self.loop = asyncio.new_event_loop()
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.console_errors: list[str] = []
        self.session = self.ws = None
        self.run(self._connect(debugger_url))

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    async def _connect(self, url: str) -> None:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)
        self.reader = self.loop.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if data.get("id") in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(data["params"]["exceptionDetails"])[:500])

    async def _send(self, method: str, params: dict) -> dict:
        self.next_id += 1
        future = self.loop.create_future()
        self.pending[self.next_id] = future
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 60)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def send(self, method: str, **params) -> dict:
        return self.run(self._send(method, params))

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {json.dumps(result['exceptionDetails'])[:800]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.2)

    def pause(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    def click_at(self, x: float, y: float, clicks: int = 1) -> None:
        for count in range(1, clicks + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=count)

    def key(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code)

    def type(self, text: str) -> None:
        self.send("Input.insertText", text=text)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        async def shutdown():
            await self.ws.close()
            await self.session.close()

        self.run(shutdown())
        self.loop.close()


@pytest.fixture(scope="module")
def page(server):
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install -y chromium); the browser tests need it"
        )
    # A returning user: the first visit would open the template browser by itself, when it chooses.
    settings = server.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tempfile.mkdtemp(prefix="hyca-chromium-")
    with open(server.base / "chromium.log", "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={profile}",
                "--window-size=1600,1000",
                "about:blank",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tab = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                target = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Chromium did not start: {(server.base / 'chromium.log').read_text()[-3000:]}"
                    )
                time.sleep(0.2)
        tab = Page(target["webSocketDebuggerUrl"])
        tab.send("Runtime.enable")
        tab.send("Page.enable")
        tab.send("Page.navigate", url=server.url + "/")
        tab.wait_for(
            "!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
            " && window.LiteGraph.registered_node_types['HyCaApply'])",
            timeout=90,
            what="ComfyUI's frontend to load with the HyCa nodes registered",
        )
        yield tab
    finally:
        if tab is not None:
            tab.close()
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        process.wait(timeout=15)
        shutil.rmtree(profile, ignore_errors=True)


def _close_dialogs(page: Page) -> None:
    """Close open dialogs as a user would: their close button, else Escape."""
    for _ in range(6):
        if not page.eval("document.querySelectorAll('[role=dialog]').length"):
            return
        count = page.eval(
            "(() => { const d = [...document.querySelectorAll('[role=dialog]')];"
            " const b = d[d.length - 1].querySelector("
            "'.p-dialog-close-button, button[aria-label=Close], button:has(> .pi-times)');"
            " if (b) b.click(); return b ? d.length : -1; })()"
        )
        if count < 0:
            page.key("Escape", "Escape", 27)
            page.pause(0.3)
        else:
            try:
                page.wait_for(f"document.querySelectorAll('[role=dialog]').length < {count}", timeout=5)
            except AssertionError:
                pass
    assert not page.eval("document.querySelectorAll('[role=dialog]').length"), (
        f"a dialog stays open: {_dialog_text(page)[:500]}"
    )


def _dialog_text(page: Page) -> str:
    return page.eval(
        "[...document.querySelectorAll('[role=dialog]')].map(d => d.innerText).join('\\n----\\n')"
    )


def test_node_search_finds_the_hyca_nodes(page):
    _close_dialogs(page)
    page.eval("app.graph.clear(); app.canvas.setDirty(true, true); true")
    x, y = page.eval(
        "(() => { const r = app.canvas.canvas.getBoundingClientRect();"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    for attempt in range(3):  # double-click on the empty canvas: the node search box
        page.click_at(x, y, clicks=2)
        try:
            page.wait_for("document.activeElement && document.activeElement.tagName === 'INPUT'", timeout=5)
            break
        except AssertionError:
            if attempt == 2:
                raise AssertionError("a double-click on the canvas opened no search box")
    # What artists type looking for a cache node; a term that finds nothing first, so that the list read is
    # the one for the term (the search box updates its results after a pause).
    for term in ("cache", "speed up", "teacache", "faster"):
        for text, shown in (("xylophone", "No results found"), (term, "HyCa")):
            page.eval("document.activeElement.select(); true")  # the typed text replaces the last one
            page.type(text)
            page.wait_for(
                f"[...document.querySelectorAll('[role=option]')].some(e => e.innerText.includes({shown!r}))",
                what=f"{shown!r} among the results for {text!r}",
            )
    page.eval("document.activeElement.select(); true")
    page.type("HyCa")
    options = page.wait_for(
        "(() => { const o = [...document.querySelectorAll('[role=option]')]"
        ".map(e => e.innerText.replace(/\\s+/g, ' ').trim()).filter(t => t);"
        " return o.filter(t => t.includes('HyCa')).length >= 3 ? o : null; })()",
        what="HyCa search results",
    )
    for title in NODES.values():
        hits = [option for option in options if option.startswith(title)]
        assert hits and "model_patches > hyca" in hits[0], (title, options)
    assert options[0].startswith("HyCa Apply"), options  # the best match for "HyCa" comes first
    page.screenshot("node_search.png")
    page.key("Enter", "Enter", 13)  # adds the highlighted node, as in the UI
    page.wait_for("app.graph._nodes.some(n => n.type.startsWith('HyCa'))", what="a HyCa node to be added")


def _open_extension_templates(page: Page, folder: str) -> list[str]:
    _close_dialogs(page)
    page.eval("app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
    page.wait_for(
        "[...document.querySelectorAll('[role=dialog] *')].some(e => e.children.length === 0"
        f" && e.textContent.trim() === {json.dumps(folder)})",
        what="the template browser's extension entry",
    )
    page.eval(
        "[...document.querySelectorAll('[role=dialog] *')].find(e => e.children.length === 0"
        f" && e.textContent.trim() === {json.dumps(folder)}).click(); true"
    )
    return page.wait_for(
        "(() => { const c = [...document.querySelectorAll('[data-testid^=\"template-workflow-\"]')]"
        ".map(e => e.dataset.testid.replace('template-workflow-', ''));"
        " return c.length ? c : null; })()",
        what="the extension's template cards",
    )


def _graph_report(page: Page) -> list[dict]:
    return page.eval(
        "app.graph._nodes.map(n => ({type: n.type, errors: !!n.has_errors,"
        " registered: !!LiteGraph.registered_node_types[n.type]}))"
    )


def test_examples_load_with_no_missing_node(page, server):
    """The first example through the template browser's cards (an artist's path); the others as the
    browser loads a card: its JSON from /api/workflow_templates/ into app.loadGraphData (quicker than
    reopening the browser, whose hundreds of official thumbnails make each opening slow)."""
    examples = sorted(path.stem for path in EXAMPLES.glob("*.json"))
    first = "FLUX.1 dev - text to image"
    assert sorted(_open_extension_templates(page, server.folder)) == examples
    # every card shows its thumbnail (the frontend fetches <name>.jpg into the card's image)
    page.wait_for(
        "[...document.querySelectorAll('[data-testid^=\"template-workflow-\"]')].every(c => {"
        " const i = c.querySelector('img'); return i && i.complete && i.naturalWidth > 0"
        " && i.naturalWidth === i.naturalHeight; })",
        what="every template card's thumbnail",
    )
    page.screenshot("template_cards.png")
    for name in [first] + [e for e in examples if e != first]:
        workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
        if name == first:
            page.eval(f"document.querySelector('[data-testid=\"template-workflow-{name}\"]').click(); true")
        else:
            _close_dialogs(page)
            url = f"/api/workflow_templates/{server.folder}/{name}.json"
            page.eval(
                f"fetch({json.dumps(url)}).then(r => r.json())"
                f".then(w => app.loadGraphData(w, true, true, {json.dumps(name)})).then(() => true)"
            )
        expected = sorted(node["type"] for node in workflow["nodes"])
        page.wait_for(
            "JSON.stringify(app.graph._nodes.map(n => n.type).sort()) === "
            + json.dumps(json.dumps(expected, separators=(",", ":"))),
            what=f"{name} to load",
        )
        # The frontend checks a loaded graph for missing nodes, then for missing models: the models dialog
        # (every example names models the test server lacks) means the node check is done.
        declared = {
            f"{m['directory']} / {m['name']}"
            for node in workflow["nodes"]
            for m in node.get("properties", {}).get("models", [])
        }
        assert declared
        dialogs = page.wait_for(
            "(() => { const t = [...document.querySelectorAll('[role=dialog]')]"
            ".map(d => d.innerText).join('\\n----\\n');"
            f" return {json.dumps(sorted(declared))}.every(e => t.includes(e)) ? t : null; }})()",
            what=f"the missing-models dialog of {name}",
        )  # with the official download links
        assert MISSING_NODES_TITLE not in dialogs, (name, dialogs)
        report = _graph_report(page)
        assert not [
            n for n in report if n["errors"] or not (n["registered"] or n["type"] in FRONTEND_ONLY)
        ], report
        if name == first:
            page.screenshot(f"{name}_missing_models.png")
            _close_dialogs(page)
            page.pause(0.3)
            page.screenshot(f"{name}.png")
    _close_dialogs(page)


def test_a_missing_node_is_reported(page):
    """The check above is not vacuous: a workflow naming an unknown node type raises the dialog."""
    _close_dialogs(page)
    workflow = json.loads((EXAMPLES / "FLUX.1 schnell - four steps.json").read_text())
    workflow["nodes"][-1]["type"] = "HyCaNoSuchNode"
    page.eval(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    dialogs = page.wait_for(
        "(() => { const t = [...document.querySelectorAll('[role=dialog]')]"
        ".map(d => d.innerText).join(' ');"
        f" return t.includes({json.dumps(MISSING_NODES_TITLE)}) ? t : null; }})()",
        what="the missing-nodes dialog",
    )
    assert "HyCaNoSuchNode" in dialogs
    _close_dialogs(page)


def test_a_workflow_saved_with_the_adaptive_mode_loads_its_other_widgets(page):
    """HyCa Apply (Advanced) as saved before its adaptive mode was removed: the mode's two values in the
    middle of the widget values, and their unlinked input slots as the frontend saves them. The frontend
    restores values by position; web/js/hyca_migrate.js drops the two first, so every other widget holds
    its saved value, and the node saves the current layout."""
    _close_dialogs(page)
    workflow = json.loads((EXAMPLES / "FLUX.1 schnell - four steps.json").read_text())
    (node,) = [n for n in workflow["nodes"] if n["type"] == "HyCaApply"]
    saved = {"interval": 3, "warmup": 1, "final_steps": 2, "fitted": True, "granularity": "stack",
             "history_dtype": "bf16", "offload_history": True, "target_speedup": 0.0, "start_percent": 0.1,
             "end_percent": 0.9, "placement": "calibrated", "fused": False}
    values = list(saved.values())
    node["widgets_values"] = values[:3] + [True, 0.5] + values[3:]  # adaptive on, tolerance 0.5
    node["inputs"] += [{"name": name, "type": kind, "widget": {"name": name}, "link": None}
                       for name, kind in (("adaptive", "BOOLEAN"), ("adaptive_tolerance", "FLOAT"))]
    page.eval(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    loaded = page.wait_for(
        "(() => { const n = app.graph._nodes.find(n => n.type === 'HyCaApply');"
        " return n && {widgets: Object.fromEntries(n.widgets.map(w => [w.name, w.value])),"
        " inputs: n.inputs.map(i => i.name), saved: n.serialize().widgets_values}; })()",
        what="HyCa Apply (Advanced) to load",
    )
    assert loaded["widgets"] == saved, loaded
    assert not {"adaptive", "adaptive_tolerance"} & set(loaded["inputs"]), loaded["inputs"]
    assert loaded["saved"] == values
    _close_dialogs(page)


def test_node_documentation_opens_from_the_node_library(page):
    _close_dialogs(page)
    page.eval(
        "app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library').then(() => true)"
    )
    page.wait_for("!!document.querySelector('input.search-box-input')", what="the node library")
    page.eval("document.querySelector('input.search-box-input').focus(); true")
    page.type("HyCa Apply")
    title = NODES["HyCaApply"]
    page.wait_for(
        f"!!document.querySelector(\"li[aria-label='{title}'] button.help-button\")",
        what=f"{title} in the node library",
    )
    page.eval(f"document.querySelector(\"li[aria-label='{title}'] button.help-button\").click(); true")
    doc = (REPO / "web" / "docs" / "HyCaApply.md").read_text()
    sentence = next(line for line in doc.splitlines() if line.startswith("Like HyCa Apply it computes"))
    page.wait_for(
        f"document.body.innerText.includes({json.dumps(sentence.split(':')[0])})",
        what="web/docs/HyCaApply.md rendered in the documentation panel",
    )
    page.screenshot("node_docs_HyCaApply.png")
    page.eval(
        "app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library').then(() => true)"
    )


KMEANS_SEED_LIMIT = 2**32  # KMeans takes random_state 0..2^32-1; Calibrate's seed goes to 2^64


def _history(server) -> dict:
    return server.get_json("/history")


def test_calibrate_runs_twice_with_randomized_seeds_queued_from_the_ui(page, server):
    """An artist sets Calibrate's seed to randomize after each run and presses Run twice. Each probe's
    seed reaches scikit-learn's KMeans (issue 15: "The 'random_state' parameter of KMeans must be ...
    Got 920065994407979"); both runs must succeed. The first seed lies above 2^32, the second is the
    frontend's random one."""
    _close_dialogs(page)
    first_seed = 920065994407979
    page.eval(
        "(() => { app.graph.clear();"
        " const add = (type, x, y, values) => { const n = LiteGraph.createNode(type); n.pos = [x, y];"
        "   app.graph.add(n); for (const [k, v] of Object.entries(values)) {"
        "     const w = n.widgets.find(w => w.name === k); if (w) w.value = v; } return n; };"
        " const link = (a, b, input) => a.connect(0, b, b.findInputSlot(input));"
        " const unet = add('UNETLoader', 0, 0, {unet_name: 'reference_wan.safetensors'});"
        f" const shift = add('ModelSamplingSD3', 320, 0, {{shift: {SHIFT}}});"
        " const positive = add('ReferenceClassConditioning', 0, 160, {class_id: 3});"
        " const negative = add('ReferenceClassConditioning', 0, 300, {class_id: -1});"
        " const latent = add('EmptyHunyuanLatentVideo', 0, 440, {width: 128, height: 128, length: 1});"
        # save off and recalibrate on (where the widget exists): every run probes, none reuses a map
        f" const calibrate = add('HyCaCalibrate', 640, 0, {{seed: {first_seed}, steps: 4, save: false,"
        "   recalibrate: true, control_after_generate: 'randomize'});"
        " const decode = add('ReferenceDecode', 1040, 0, {});"
        " const preview = add('PreviewImage', 1280, 0, {});"
        " link(unet, shift, 'model'); link(shift, calibrate, 'model'); link(positive, calibrate, 'positive');"
        " link(negative, calibrate, 'negative'); link(latent, calibrate, 'latent_image');"
        " calibrate.connect(1, decode, decode.findInputSlot('samples')); link(decode, preview, 'images');"
        " app.canvas.setDirty(true, true); return true; })()"
    )
    seed = ("app.graph._nodes.find(n => n.type === 'HyCaCalibrate')"
            ".widgets.find(w => w.name === 'seed').value")
    assert page.eval(seed) == first_seed
    before = set(_history(server))
    for run in range(2):
        _close_dialogs(page)  # e.g. the report of a failed first run, which covers the button
        x, y = page.eval(
            "(() => { const r = document.querySelector('[data-testid=\"queue-button\"]')"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        queued = page.eval(seed)
        page.click_at(x, y)  # the Run button, as an artist presses it
        page.wait_for(f"{seed} !== {queued}", what=f"run {run + 1} to be queued (its seed then randomized)")
    page.screenshot("calibrate_twice.png")
    deadline = time.monotonic() + 600
    while True:
        runs = {key: entry for key, entry in _history(server).items() if key not in before}
        if len(runs) == 2 and all(e.get("status", {}).get("completed") is not None for e in runs.values()):
            break
        assert time.monotonic() < deadline, f"the two runs did not finish: {runs}\n{server.log()[-3000:]}"
        time.sleep(0.5)
    seeds = sorted(
        node["inputs"]["seed"] for entry in runs.values() for node in entry["prompt"][2].values()
        if node["class_type"] == "HyCaCalibrate"
    )
    assert len(seeds) == 2 and seeds[1] >= KMEANS_SEED_LIMIT and first_seed in seeds, seeds
    failed = {key: entry["status"] for key, entry in runs.items()
              if entry["status"].get("status_str") != "success"}
    assert not failed, json.dumps(failed, indent=1)[-4000:]
