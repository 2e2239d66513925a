"""The notebooks: committed clean, one documented parameters cell each, and they run headlessly (smoke profile)."""

import json
from pathlib import Path

import papermill as pm
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
FIGURES = {
    "00_overview.ipynb": ["00-pipeline"],
    "01_data.ipynb": ["01-labels", "01-sample-streams"],
    "02_model.ipynb": ["02-positions", "02-attention", "02-parameters"],
}


def test_the_ordered_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == sorted(FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs_or_execution_counts(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or
                                                                                   c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_documented_parameters_cell(path):
    nb = json.loads(path.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    params = pm.inspect_notebook(str(path))
    for name in ("dataset", "alignment", "profile", "seeds", "data_path"):
        assert name in params, f"{path.name} lacks parameter {name}"
        assert params[name]["help"], f"{path.name}: parameter {name} has no comment to document it"
    assert params["profile"]["help"] == "smoke | quick | paper"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KTLIB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headlessly_in_the_smoke_profile(path, sandbox):
    out = sandbox / path.name
    figures = sandbox / "figures"
    pm.execute_notebook(str(path), str(out), parameters={"profile": "smoke", "figures_dir": str(figures)},
                        kernel_name="python3", cwd=str(path.parent), progress_bar=False,
                        execution_timeout=300)
    for name in FIGURES[path.name]:
        for suffix in (".png", ".pdf"):
            figure = figures / f"{name}{suffix}"
            assert figure.is_file() and figure.stat().st_size > 1000, f"{figure.name} missing or empty"
    text = out.read_text()
    assert "synthetic (simulator)" in text, "a run on the simulator says so"


def test_out_of_range_parameter_stops_with_a_clear_message(sandbox):
    path = NOTEBOOKS[0]
    with pytest.raises(pm.PapermillExecutionError, match="profile='fast': choose one of"):
        pm.execute_notebook(str(path), str(sandbox / "bad.ipynb"), parameters={"profile": "fast"},
                            kernel_name="python3", cwd=str(path.parent), progress_bar=False,
                            execution_timeout=300)


def test_setup_lists_every_bad_parameter_at_once(sandbox):
    from ktlib.workbook import setup

    with pytest.raises(ValueError) as err:
        setup(dataset="cmu", alignment="sideways", profile_name="quick", seeds=0, scale=2.0)
    message = str(err.value)
    for part in ("dataset='cmu'", "alignment='sideways'", "seeds=0", "scale=2.0"):
        assert part in message


def test_setup_loads_the_simulator_with_the_profiles_scale(sandbox):
    from ktlib.workbook import setup

    wb = setup(dataset="iemocap", alignment="unaligned", profile_name="smoke", seeds=2, source="simulated",
               figures_dir=str(sandbox / "figs"))
    assert wb.seeds == [1, 2] and wb.data.synthetic and wb.data.sim_config.scale == 0.05
    assert wb.label == "iemocap_unaligned [synthetic (simulator)]"
