"""JupyterLab works for a person: a headless Chromium opens a notebook in JupyterLab on 127.0.0.1, runs every
cell, moves a widget, and saves a screenshot (``runs/browser/``, or ``$KTLIB_SCREENSHOT_DIR``).

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (``make browser-test`` installs
them where it can); skipped with the reason when they are absent.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
NOTEBOOK = "01_data.ipynb"

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver, or make browser-test)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of the notebooks, with its own data and run folders."""
    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder)
    port, token = _free_port(), "ktlib-browser-test"
    env = dict(os.environ, KTLIB_DATA_DIR=str(tmp_path / "data"), KTLIB_RUNS_DIR=str(tmp_path / "runs"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    env.pop("MPLBACKEND", None)  # the tests' Agg backend would hide inline figures; a person's lab has none set
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and server.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
        yield {"url": f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}", "folder": folder}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_notebook_runs_in_jupyterlab_in_a_browser(lab):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    shots = Path(os.environ.get("KTLIB_SCREENSHOT_DIR", ROOT / "runs" / "browser"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(lab["url"])
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.execute_script(
            "const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
            "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle');"))
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
        WebDriverWait(driver, 600, poll_frequency=2).until(lambda d: d.execute_script(
            "const w = window.jupyterapp.shell.currentWidget; const cells = w.content.widgets;"
            "return cells.filter(c => c.model.type === 'code').every(c => c.model.executionCount !== null) &&"
            " w.sessionContext.session.kernel.status === 'idle';"))
        # move the utterance slider one step, as a person would with the keyboard; the picture must change
        picture = "return (document.querySelector('img.widget-image') || {}).src || '';"
        before = wait.until(lambda d: d.execute_script(picture))
        handle = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
                            or d.find_elements(By.CSS_SELECTOR, ".widget-slider .ui-slider-handle"))[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
        handle.click()
        handle.send_keys("\ue014")  # arrow right
        wait.until(lambda d: d.execute_script(picture) not in ("", before))
        time.sleep(1)
        driver.save_screenshot(str(shots / "jupyterlab-01_data-widget.png"))
        driver.execute_script("window.jupyterapp.commands.execute('docmanager:save');")
        time.sleep(2)
    except Exception:
        driver.save_screenshot(str(shots / "jupyterlab-failure.png"))  # what the browser showed when it failed
        print("browser console:", driver.get_log("browser")[-20:] if hasattr(driver, "get_log") else "")
        raise
    finally:
        driver.quit()
    saved = json.loads((lab["folder"] / NOTEBOOK).read_text())
    errors = [o for c in saved["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"cells raised in JupyterLab: {[e.get('ename') for e in errors]}"
    counts = [c.get("execution_count") for c in saved["cells"] if c["cell_type"] == "code"]
    assert all(counts), f"not every code cell ran: {counts}"
    images = [o for c in saved["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    assert (shots / "jupyterlab-01_data-widget.png").stat().st_size > 10_000
