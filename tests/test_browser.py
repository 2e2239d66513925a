"""JupyterLab works for a person: a headless Chromium opens each notebook that has a widget in JupyterLab on
127.0.0.1, runs every cell, moves the widget, sees its picture change, and saves a screenshot (``runs/browser/``,
or ``$KTLIB_SCREENSHOT_DIR``).

The notebooks run on copies set to the ``smoke`` profile, in order, sharing one data folder and run store (the
later notebooks read back the runs of the earlier ones).  Needs Debian's ``chromium`` and ``chromium-driver`` and
the ``selenium`` package (``make browser-test`` installs them where it can); skipped with the reason when they
are absent.
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
# Every notebook with a widget (ktlib.widgets), and how a person moves it: a slider one step with the keyboard,
# a dropdown to its second choice, or a slider then the button that redraws.
WIDGETS = {"01_data.ipynb": "slider", "03_training.ipynb": "slider", "04_ablations.ipynb": "slider+button",
           "05_reconstruction.ipynb": "slider", "07_robustness.ipynb": "dropdown"}
PICTURE = "return (document.querySelector('img.widget-image') || {}).src || '';"  # the explorer's picture

needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver, or make browser-test)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Copies of the notebooks in the smoke profile, and the data and run folders they share."""
    root = tmp_path_factory.mktemp("browser")
    folder = root / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder)
    for path in folder.glob("*.ipynb"):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                cell["source"] = [line.replace('profile: str = "quick"', 'profile: str = "smoke"')
                                  for line in cell["source"]]
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return root


@pytest.fixture
def lab(store, tmp_path):
    """A JupyterLab server on 127.0.0.1 serving the copies of the notebooks, with the shared data and run folders."""
    port, token = _free_port(), "ktlib-browser-test"
    env = dict(os.environ, KTLIB_DATA_DIR=str(store / "data"), KTLIB_RUNS_DIR=str(store / "runs"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    env.pop("MPLBACKEND", None)  # the tests' Agg backend would hide inline figures; a person's lab has none set
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={store / 'notebooks'}",
         "--LabApp.expose_app_in_browser=True", *(["--allow-root"] if os.geteuid() == 0 else [])],
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
        yield {"url": f"http://127.0.0.1:{port}/lab/tree/{{notebook}}?reset&token={token}",
               "folder": store / "notebooks"}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _move(driver, wait, how: str) -> None:
    """Move the notebook's widget as a person would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    if how == "dropdown":
        select = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".widget-dropdown select"))[-1]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", select)
        Select(select).select_by_index(1)
        return
    handle = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
                        or d.find_elements(By.CSS_SELECTOR, ".widget-slider .ui-slider-handle"))[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    handle.click()
    handle.send_keys("\ue014")  # arrow right: one step
    if how == "slider+button":
        button = wait.until(lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button.jupyter-button")
                                       if b.text.strip() == "simulate"])[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
        button.click()


@needs_browser
@pytest.mark.parametrize("notebook", list(WIDGETS))
def test_a_notebook_runs_in_jupyterlab_and_its_widget_redraws(lab, notebook):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    shots = Path(os.environ.get("KTLIB_SCREENSHOT_DIR", ROOT / "runs" / "browser"))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"jupyterlab-{Path(notebook).stem}-widget.png"
    try:
        driver.get(lab["url"].format(notebook=notebook))
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.execute_script(
            "const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
            "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle');"))
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
        WebDriverWait(driver, 1800, poll_frequency=2).until(lambda d: d.execute_script(
            "const w = window.jupyterapp.shell.currentWidget; const cells = w.content.widgets;"
            "return cells.filter(c => c.model.type === 'code').every(c => c.model.executionCount !== null) &&"
            " w.sessionContext.session.kernel.status === 'idle';"))
        # move the widget; the picture must change (notebook 4 simulates a small dataset first: minutes)
        before = wait.until(lambda d: d.execute_script(PICTURE))
        _move(driver, wait, WIDGETS[notebook])
        WebDriverWait(driver, 600, poll_frequency=1).until(lambda d: d.execute_script(PICTURE) not in ("", before))
        time.sleep(1)
        driver.save_screenshot(str(shot))
        driver.execute_script("window.jupyterapp.commands.execute('docmanager:save');")
        time.sleep(2)
    except Exception:
        driver.save_screenshot(str(shots / f"jupyterlab-{Path(notebook).stem}-failure.png"))  # what it showed
        print("browser console:", driver.get_log("browser")[-20:] if hasattr(driver, "get_log") else "")
        raise
    finally:
        driver.quit()
    saved = json.loads((lab["folder"] / notebook).read_text())
    errors = [o for c in saved["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"cells raised in JupyterLab: {[e.get('ename') for e in errors]}"
    counts = [c.get("execution_count") for c in saved["cells"] if c["cell_type"] == "code"]
    assert all(counts), f"not every code cell ran: {counts}"
    images = [o for c in saved["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    assert shot.stat().st_size > 10_000


def test_every_notebook_with_a_widget_is_covered():
    # runs without a browser: a notebook that gains an explorer (ktlib.widgets) must be added to WIDGETS
    with_widgets = {p.name for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
                    if "ktlib.widgets" in p.read_text()}
    assert with_widgets == set(WIDGETS)
