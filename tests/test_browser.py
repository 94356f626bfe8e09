"""End to end in a real browser: JupyterLab + headless Chromium (Playwright) + the corrector.

A JupyterLab server is started on 127.0.0.1 (free port, token, --no-browser) with a temporary
root holding a small notebook; headless Chromium opens it, runs all cells, waits for the canvas
widget, paints a stroke with the mouse, checks the canvas pixels and the hover read-out, presses
the widget's Save button and reads the saved mask file; then undoes with ctrl+z on the canvas and
saves again; draws a closed outline that fills itself; types a contrast value and sees the
canvas change; and saves the viewer's masks into a folder typed into its "save to" box.
Screenshots go to ``test-artifacts/browser/``.

Needs /usr/bin/chromium (``scripts/install_browser.sh``) and the ``jupyter`` extra; skipped with
the reason otherwise.
"""

from __future__ import annotations

import colorsys
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("CPSAM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]

LABEL = 7
GREY = 90
H, W = 120, 160

NOTEBOOK_CELLS = [
    "import numpy as np\n"
    "from cpsam_toolkit.widgets import Corrector\n"
    f"image = np.full(({H}, {W}), {GREY}, np.uint8)\n"
    "image[0, 0], image[-1, -1] = 0, 255   # so the display stretch keeps the grey level\n"
    "c = Corrector([image], out_dir='.', names=['browser_test'], height=360)\n"
    f"c.tools.value = 'brush'; c.label_id.value = {LABEL}; c.radius.value = 5\n"
    "c.canvas.overlay = 'filled'; c.canvas.opacity = 1.0\n"
    "c",
    # a 1024 x 1024 result with 676 objects in the viewer (no network needed)
    "from cpsam_toolkit.segment import MaskOptions, SegmentationResult\n"
    "from cpsam_toolkit.widgets import Viewer\n"
    "yy, xx = np.mgrid[:1024, :1024]\n"
    "cp = (3 - 0.4 * np.hypot(yy % 40 - 20, xx % 40 - 20)).astype(np.float32)\n"
    "masks = ((yy // 40) * 26 + xx // 40 + 1).astype(np.uint16) * (cp > 0)\n"
    "res = SegmentationResult(masks, np.zeros((2, 1024, 1024), np.float32), cp, MaskOptions())\n"
    "v = Viewer(cp, result=res, background=False, height=400, name='viewer_test')\n"
    "v",
]


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run scripts/install_browser.sh (apt-get install chromium)"
    for mod in ("playwright", "jupyterlab", "anywidget", "ipywidgets"):
        try:
            __import__(mod)
        except ImportError:
            return f"python package {mod!r} is missing (pip install 'cpsam-toolkit[jupyter,dev]' playwright)"
    return None


_reason = _skip_reason()
if _reason:
    pytestmark = [pytest.mark.browser, pytest.mark.skip(reason=_reason)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab_root")
    home = tmp_path_factory.mktemp("lab_home")
    _write_notebook(root / "browser_test.ipynb")
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, HOME=str(home), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_PATH=os.pathsep.join([str(Path(sys.prefix) / "share" / "jupyter")]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={home / 'settings'}",
           f"--LabApp.workspaces_dir={home / 'workspaces'}", "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {(home / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"jupyter lab did not start: {(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "token": token, "root": root, "log": home / "server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(home / "server.log", ARTIFACTS / "jupyterlab-server.log")


def _label_rgb(label: int) -> np.ndarray:
    """The canvas's colour of a label (same formula as the JavaScript)."""
    h = (label * 0.6180339887498949) % 1
    return np.round(np.array(colorsys.hsv_to_rgb(h, 0.75, 1.0)) * 255)


def _canvas_pixel(page, canvas, fx: float, fy: float) -> np.ndarray:
    """RGB of the canvas at a fraction (fx, fy) of its CSS box."""
    return np.array(canvas.evaluate(
        """(c, [fx, fy]) => {
            const x = Math.floor(c.width * fx), y = Math.floor(c.height * fy);
            const d = c.getContext('2d').getImageData(x, y, 1, 1).data;
            return [d[0], d[1], d[2]];
        }""", [fx, fy]), dtype=float)


def _image_to_screen(box: dict, y: float, x: float) -> tuple[float, float]:
    """Screen position of image pixel (y, x) for the canvas's fitted view."""
    s = min(box["width"] / W, box["height"] / H)
    ox = box["x"] + (box["width"] - W * s) / 2
    oy = box["y"] + (box["height"] - H * s) / 2
    return ox + (x + 0.5) * s, oy + (y + 0.5) * s


def test_paint_save_undo_in_jupyterlab(lab_server):
    import tifffile
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    root: Path = lab_server["root"]
    mask_file = root / "browser_test_masks.tif"
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"{lab_server['url']}/lab/tree/browser_test.ipynb?token={lab_server['token']}",
                      timeout=180_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell "
                                   "&& window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext",
                                   timeout=180_000)
            page.wait_for_function("() => { const s = window.jupyterapp.shell.currentWidget.sessionContext;"
                                   " return s.session && s.session.kernel && "
                                   "s.session.kernel.connectionStatus === 'connected'; }", timeout=180_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

            cell = page.locator(".jp-Notebook .jp-Cell").nth(0)
            canvas = cell.locator(".cpsam-wrap canvas").first
            canvas.wait_for(state="visible", timeout=180_000)
            cell.get_by_text("tool: brush").first.wait_for(timeout=60_000)
            canvas.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "1-rendered.png"))
            box = canvas.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100, box

            # background before painting: the grey image
            y_mid, x0, x1 = 60, 40, 120
            fx = lambda x: (_image_to_screen(box, y_mid, x)[0] - box["x"]) / box["width"]  # noqa: E731
            fy = (_image_to_screen(box, y_mid, 80)[1] - box["y"]) / box["height"]
            before = _canvas_pixel(page, canvas, fx(80), fy)
            assert np.all(np.abs(before - GREY) < 12), before

            # paint a horizontal stroke with the mouse
            sx, sy = _image_to_screen(box, y_mid, x0)
            ex, _ = _image_to_screen(box, y_mid, x1)
            page.mouse.move(sx, sy)
            page.mouse.down()
            for k in range(1, 21):
                page.mouse.move(sx + (ex - sx) * k / 20, sy)
            page.mouse.up()
            # the kernel applies the stroke and sends the labels back: the canvas redraws them
            cell.get_by_text("1 objects").first.wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "2-painted.png"))
            after = _canvas_pixel(page, canvas, fx(80), fy)
            colour = _label_rgb(LABEL)
            assert np.abs(after - colour).max() < 16, (after, colour)
            outside = _canvas_pixel(page, canvas, fx(80), (_image_to_screen(box, 100, 80)[1] - box["y"])
                                    / box["height"])
            assert np.all(np.abs(outside - GREY) < 12), outside

            # hover read-out (client-side, from the object table the kernel sent)
            hx, hy = _image_to_screen(box, y_mid, 80)
            page.mouse.move(hx, hy)
            tip = cell.locator(".cpsam-tip")
            tip.wait_for(state="visible", timeout=10_000)
            assert f"object {LABEL}" in tip.inner_text()
            page.screenshot(path=str(ARTIFACTS / "3-hover.png"))

            # the widget's Save button writes the masks next to the notebook
            cell.locator("button.jupyter-button", has_text="Save").first.click()
            cell.get_by_text("saved browser_test_masks.tif").first.wait_for(timeout=60_000)
            deadline = time.time() + 30
            while not mask_file.exists() and time.time() < deadline:
                time.sleep(0.2)
            saved = tifffile.imread(mask_file)
            assert saved.shape == (H, W)
            assert set(np.unique(saved)) == {0, LABEL}
            assert saved[y_mid, 80] == LABEL and saved[y_mid, x0] == LABEL and saved[y_mid, x1] == LABEL
            assert saved[y_mid + 4, 80] == LABEL and saved[y_mid + 7, 80] == 0  # radius 5
            assert saved[y_mid, x0 - 7] == 0 and saved[y_mid, x1 + 7] == 0
            area = int((saved == LABEL).sum())
            assert 800 < area < 1100, area  # ~ 80 x 11 capsule
            page.screenshot(path=str(ARTIFACTS / "4-saved.png"))

            # keyboard undo on the focused canvas reaches the kernel, then save again
            canvas.click(position={"x": 5, "y": 5}, button="right")  # focus without painting
            canvas.focus()
            page.keyboard.press("Control+z")
            cell.get_by_text("0 objects").first.wait_for(timeout=60_000)
            cell.locator("button.jupyter-button", has_text="Save").first.click()
            deadline = time.time() + 30
            while time.time() < deadline:
                if tifffile.imread(mask_file).max() == 0:
                    break
                time.sleep(0.3)
            assert tifffile.imread(mask_file).max() == 0

            # tool shortcuts go to the canvas, not to JupyterLab ("d d" would delete the cell)
            canvas.focus()
            page.keyboard.press("d")
            page.keyboard.press("d")
            cell.get_by_text("tool: delete").first.wait_for(timeout=30_000)
            assert page.locator(".jp-Notebook .jp-Cell").count() == len(NOTEBOOK_CELLS)
            canvas.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            page.screenshot(path=str(ARTIFACTS / "5-undone.png"))

            # a closed outline drawn with a thin brush fills itself (as in the cellpose GUI)
            page.keyboard.press("b")
            for _ in range(4):
                page.keyboard.press("[")  # radius 5 -> 1
            cell.get_by_text("radius 1").first.wait_for(timeout=30_000)
            cy, cx, r = 60, 80, 30
            pts = [_image_to_screen(box, cy + r * np.sin(a), cx + r * np.cos(a))
                   for a in np.linspace(0, 2 * np.pi, 48)]
            page.mouse.move(*pts[0])
            page.mouse.down()
            for q in pts[1:]:
                page.mouse.move(*q)
            page.mouse.up()
            cell.get_by_text("1 objects").first.wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "7-outline-filled.png"))
            centre = _canvas_pixel(page, canvas, fx(cx), fy)
            assert np.abs(centre - _label_rgb(LABEL)).max() < 16, centre  # the inside is filled
            cell.locator("button.jupyter-button", has_text="Save").first.click()
            deadline = time.time() + 30
            while time.time() < deadline and tifffile.imread(mask_file)[cy, cx] == 0:
                time.sleep(0.3)
            saved = tifffile.imread(mask_file)
            area = int((saved == LABEL).sum())
            assert saved[cy, cx] == LABEL and 2600 < area < 3300, area  # ~ pi * 31^2

            # contrast (typed into the slider's readout) changes the canvas, in the browser
            bg_y = (_image_to_screen(box, 110, 150)[1] - box["y"]) / box["height"]
            bg = _canvas_pixel(page, canvas, fx(150), bg_y)
            assert np.all(np.abs(bg - GREY) < 12), bg
            contrast = cell.locator(".widget-slider", has_text="contrast").first
            readout = contrast.locator(".widget-readout").first
            readout.click()
            page.keyboard.press("Control+a")
            page.keyboard.type("3")
            page.keyboard.press("Enter")
            page.wait_for_function(
                """([c, fx, fy]) => { const d = c.getContext('2d').getImageData(
                    Math.floor(c.width * fx), Math.floor(c.height * fy), 1, 1).data; return d[0] < 40; }""",
                arg=[canvas.element_handle(), fx(150), bg_y], timeout=30_000)
            dark = _canvas_pixel(page, canvas, fx(150), bg_y)
            assert np.all(dark < 40), dark  # grey 90 at contrast 3 around mid-grey: black
            page.screenshot(path=str(ARTIFACTS / "8-contrast.png"))
            cell.locator("button.jupyter-button", has_text="reset levels").first.click()
            page.wait_for_timeout(800)
            assert np.all(np.abs(_canvas_pixel(page, canvas, fx(150), bg_y) - GREY) < 12)

            # the viewer draws a 1024 x 1024 label image with 676 objects client-side, fast
            cell2 = page.locator(".jp-Notebook .jp-Cell").nth(1)
            cell2.get_by_text("676 objects").first.wait_for(timeout=180_000)
            root2 = cell2.locator(".cpsam-root").first
            page.wait_for_function("(el) => el.dataset.renderMs !== undefined", arg=root2.element_handle(),
                                   timeout=60_000)
            render_ms = float(root2.get_attribute("data-render-ms"))
            (ARTIFACTS / "render-1024.txt").write_text(f"{render_ms:.1f} ms\n")
            assert render_ms < 1000, render_ms
            canvas2 = cell2.locator(".cpsam-wrap canvas").first
            canvas2.scroll_into_view_if_needed()
            b2 = canvas2.bounding_box()
            s2 = min(b2["width"], b2["height"]) / 1024
            ox = b2["x"] + (b2["width"] - 1024 * s2) / 2
            oy = b2["y"] + (b2["height"] - 1024 * s2) / 2
            page.mouse.move(ox + 60.5 * s2, oy + 20.5 * s2)  # the centre of object 2 (row 0, column 1)
            tip2 = cell2.locator(".cpsam-tip")
            tip2.wait_for(state="visible", timeout=10_000)
            assert "object 2" in tip2.inner_text() and "area" in tip2.inner_text()
            # wheel zoom happens in the browser
            before_zoom = cell2.locator(".cpsam-status").inner_text()
            page.mouse.wheel(0, -600)
            page.wait_for_timeout(200)
            assert cell2.locator(".cpsam-status").inner_text() != before_zoom
            page.screenshot(path=str(ARTIFACTS / "6-viewer-1024.png"))

            # the viewer saves into the folder typed into its "save to" box
            folder = cell2.get_by_placeholder("folder")
            folder.fill("chosen/sub")
            folder.press("Enter")
            cell2.locator("button.jupyter-button", has_text="Save masks").first.click()
            cell2.get_by_text("saved chosen/sub/viewer_test_masks.tif").first.wait_for(timeout=60_000)
            saved_v = root / "chosen" / "sub" / "viewer_test_masks.tif"
            assert saved_v.exists() and int(tifffile.imread(saved_v).max()) == 676
            page.screenshot(path=str(ARTIFACTS / "9-viewer-saved.png"))
        except Exception:
            try:
                page.screenshot(path=str(ARTIFACTS / "failure.png"))
            finally:
                (ARTIFACTS / "console.log").write_text("\n".join(console))
            raise
        finally:
            (ARTIFACTS / "console.log").write_text("\n".join(console))
            browser.close()
