"""The notebooks: committed clean, one documented parameters cell each, and they run headlessly (smoke profile)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import papermill as pm
import pytest

from ktlib.workbook import execute_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
FIGURES = {
    "00_overview.ipynb": ["00-pipeline"],
    "01_data.ipynb": ["01-labels", "01-sample-streams"],
    "02_model.ipynb": ["02-positions", "02-attention", "02-parameters"],
    "03_training.ipynb": ["03-learning-curves", "03-results", "03-predictions"],
    "04_ablations.ipynb": ["04-consistency-loss", "04-targets", "04-lambda", "04-transfer-intervals", "04-probes"],
    "05_reconstruction.ipynb": ["05-r2-sweep", "05-pca", "05-umap", "05-cosine", "05-mse",
                                "05-per-dim-corr", "05-cka", "05-sample-over-time"],
    "06_results.ipynb": ["06-paired", "06-claims"],
    "07_robustness.ipynb": ["07-fixed", "07-modality-test", "07-frame-test", "07-modality-train_test"],
}
# Beyond the defaults, so that the test covers missing data at train and test too (a run per rate: two rates).
EXTRA_PARAMETERS = {"07_robustness.ipynb": {"train_test_kinds": "modality", "train_test_rates": "0,1"}}
SETTINGS = {"full", "vision_only", "language_only", "language_vision", "kt"}


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


def test_model_notebook_teaches_each_equation_on_its_own():
    """Notebook 2 reads like the annotated transformer: eq. 1-6 each in LaTeX, each followed by a code cell that runs
    the piece and asserts; every paper piece runs on its own; source is shown whole, never sliced."""
    cells = json.loads((NOTEBOOKS[0].parent / "02_model.ipynb").read_text())["cells"]
    prose = ["".join(c["source"]) if c["cell_type"] == "markdown" else "" for c in cells]
    for n in range(1, 7):
        at = [i for i, text in enumerate(prose) if f"\\tag{{{n}}}" in text]
        assert len(at) == 1, f"eq. {n}: expected one markdown cell with its LaTeX (\\tag{{{n}}})"
        after = cells[at[0] + 1]
        assert after["cell_type"] == "code" and "assert " in "".join(after["source"]), f"eq. {n}: no checked code"
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for piece in ("ModalityProjection", "KnowledgeTransfer", "Reconstruction", "CrossModalAttention",
                  "TransformerLayer", "MulTBackbone", "KTModel"):
        assert f"{piece}(" in code, f"{piece} never runs in notebook 2"
    assert "getsource(" in code and not re.search(r"getsource\([^()]*\)\s*\)?\s*\[", code), "source shown sliced"
    overview = "".join("".join(c["source"]) for c in json.loads(NOTEBOOKS[0].read_text())["cells"])
    assert all(f"\\tag{{{n}}}" in overview for n in (1, 2, 6)), "notebook 0 states eq. 1, 2 and 6"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KTLIB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every notebook run in order, headlessly, in the smoke profile, sharing one data folder and run store (as
    ``make reproduce`` does); records which runs each notebook added to the store."""
    root = tmp_path_factory.mktemp("workbook")
    env = {"KTLIB_DATA_DIR": str(root / "data"), "KTLIB_RUNS_DIR": str(root / "runs"), "MPLBACKEND": "Agg"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    added, outputs = {}, {}
    try:
        for path in NOTEBOOKS:
            before = {p.parent.name for p in (root / "runs").glob("*/metrics.json")}
            outputs[path.name] = root / path.name
            execute_notebook(path, outputs[path.name], {"profile": "smoke", "figures_dir": str(root / "figures"),
                                                        **EXTRA_PARAMETERS.get(path.name, {})}, timeout=300)
            after = {p.parent.name for p in (root / "runs").glob("*/metrics.json")}
            added[path.name] = after - before
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"root": root, "figures": root / "figures", "tables": root / "runs" / "tables", "added": added,
            "outputs": outputs}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headlessly_and_writes_its_figures(path, executed):
    for name in FIGURES[path.name]:
        for suffix in (".png", ".pdf"):
            figure = executed["figures"] / f"{name}{suffix}"
            assert figure.is_file() and figure.stat().st_size > 1000, f"{figure.name} missing or empty"
    text = executed["outputs"][path.name].read_text()
    assert "synthetic (simulator)" in text, "a run on the simulator says so"


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS if p.name[:2] in ("03", "04", "05", "06", "07")])
def test_results_notebooks_open_with_their_question_and_close_with_a_computed_answer(executed, name):
    cells = json.loads(executed["outputs"][name].read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown" and "**The question:**" in "".join(cells[0]["source"])
    last = [c for c in cells if c["cell_type"] == "code"][-1]
    answer = "".join("".join(o.get("text", "")) for o in last["outputs"] if o["output_type"] == "stream")
    assert "from ktlib import answers" in "".join(last["source"])  # computed from the runs, not typed in
    assert answer.startswith("[synthetic (simulator)]") and len(answer) > 100, answer  # in words, labelled


def _finite_cells(table: pd.DataFrame, column: str) -> np.ndarray:
    """Numbers of a column, reading 'mean ± std' strings as their mean."""
    return table[column].astype(str).str.split(" ± ").str[0].astype(float).to_numpy()


@pytest.mark.parametrize("name", ["03-results", "06-main"])
def test_results_tables_hold_finite_numbers_for_every_setting(executed, name):
    table = pd.read_csv(executed["tables"] / f"{name}.csv")
    assert set(table["setting"]) == SETTINGS
    assert (table["data"] == "synthetic (simulator)").all()
    for column in ("MAE", "Corr", "Acc2", "F1", "Acc7"):
        assert np.isfinite(_finite_cells(table, column)).all(), f"{name}: {column} not finite"
    assert np.isfinite(table["MAE (paper)"]).all()  # the paper's row for every setting


def test_ablation_and_analysis_tables_are_complete_and_finite(executed):
    tables = executed["tables"]
    for name, variants in (("04-consistency-loss", {"L1", "L2"}),
                           ("04-targets", {"all targets", "target=language", "target=audio", "target=vision"}),
                           ("04-lambda", {"lambda=0", "lambda=1"})):
        table = pd.read_csv(tables / f"{name}.csv")
        assert set(table["variant"]) == variants and np.isfinite(table["mean"]).all()
    verdicts = pd.read_csv(tables / "04-transfer-verdicts.csv")
    assert set(verdicts["method"]) == {"kt target=placebo_memory +f'A", "kt target=audio_memory +f'A"}
    assert set(verdicts["cell"]) == {"default"}
    assert set(verdicts["transfer"]) <= {"shown", "not shown"}
    intervals = pd.read_csv(tables / "04-transfer-intervals.csv")
    assert set(intervals["verdict"]) <= {"supported", "opposite", "undecided"}
    assert (intervals["signs"].str[-2:] == "/2").all()  # two seeds paired
    outcomes = pd.read_csv(tables / "04-predictions.csv")
    assert {"P2", "P4"} == set(outcomes["prediction"])  # P1 and P3 need the controls (not run by default)
    r2 = pd.read_csv(tables / "05-r2.csv")
    assert {"label-relevant", "shared", "private", "nuisance"} == set(r2["truth"]) and np.isfinite(r2["R2"]).all()
    sweep = pd.read_csv(tables / "05-r2-sweep.csv")
    assert set(sweep["audio_shared"]) == {0.0, 0.8} and "private" not in set(sweep[sweep["audio_shared"] == 1]["truth"])
    recon = pd.read_csv(tables / "05-reconstruction.csv")
    assert len(recon) == 3 and np.isfinite(recon.drop(columns=["reconstruction", "data"]).to_numpy(dtype=float)).all()
    for table in tables.glob("*.csv"):  # every table says which data it comes from
        assert set(pd.read_csv(table)["data"]) == {"synthetic (simulator)"}, table.name
    claims = pd.read_csv(tables / "06-claims.csv")
    assert claims["verdict"].notna().all() and np.isfinite(claims["mean_diff"]).all()
    assert set(claims["verdict"]) <= {"supported", "opposite", "undecided", "undecided (1 seed)"}


def test_later_notebooks_read_runs_back_instead_of_training_again(executed):
    added = executed["added"]
    assert len(added["03_training.ipynb"]) == 15  # five settings x three seeds
    # notebook 5 trains only the audio_shared=0 runs of its sweep (kt, main variant, and the audio_only run its
    # target comes from); 0.8 is notebook 4's
    new = added["05_reconstruction.ipynb"]
    assert len(new) == 2 and {r.split("-")[1] for r in new} == {"audio_only", "kt"}
    assert not added["06_results.ipynb"], "notebook 6 retrained runs of notebooks 3 and 4"
    # kt_any and the student for 2 seeds at test only, then 3 methods x 2 seeds at rate 1 in training; the MulT
    # runs at rate 0 (also the teachers) are notebook 3's
    new = added["07_robustness.ipynb"]
    assert len(new) == 4 + 6 and sum("-full-" in rid for rid in new) == 6


def test_robustness_tables_cover_every_method_protocol_and_rate(executed):
    tables = executed["tables"]
    test_only = pd.read_csv(tables / "07-robustness-test.csv")
    methods = {"MulT (zero-fill)", "kt (any modality)", "distillation"}
    assert set(test_only["method"]) == methods and set(test_only["kind"]) == {"fixed", "modality", "frame"}
    per_kind = test_only[test_only["metric"] == "mae"].groupby("kind")["level"].nunique().to_dict()
    assert per_kind == {"fixed": 6, "modality": 11, "frame": 11}
    assert np.isfinite(test_only[test_only["metric"] == "mae"]["value"]).all()
    auilc = pd.read_csv(tables / "07-auilc.csv")
    mae = auilc[auilc["metric"] == "mae"]
    assert len(mae) == 3 * 3 and np.isfinite(mae["mean"]).all() and (mae["seeds"] == 2).all()
    assert set(zip(mae["kind"], mae["phase"], strict=True)) == {("modality", "test"), ("frame", "test"),
                                                   ("modality", "train_test")}


def test_out_of_range_parameter_stops_with_a_clear_message(sandbox):
    path = NOTEBOOKS[0]
    with pytest.raises(pm.PapermillExecutionError, match="profile='fast': choose one of"):
        execute_notebook(path, sandbox / "bad.ipynb", {"profile": "fast"}, timeout=300)


def test_setup_lists_every_bad_parameter_at_once(sandbox):
    from ktlib.workbook import setup

    with pytest.raises(ValueError) as err:
        setup(dataset="cmu", alignment="sideways", profile_name="quick", seeds=0, scale=2.0, scheduler=8786)
    message = str(err.value)
    for part in ("dataset='cmu'", "alignment='sideways'", "seeds=0", "scale=2.0",
                 "scheduler=8786: a Dask scheduler address such as 'tcp://host:8786', or ''"):
        assert part in message


def test_setup_loads_the_simulator_with_the_profiles_scale(sandbox):
    from ktlib.workbook import setup

    wb = setup(dataset="iemocap", alignment="unaligned", profile_name="smoke", seeds=2, source="simulated",
               figures_dir=str(sandbox / "figs"))
    assert wb.seeds == [1, 2] and wb.data.synthetic and wb.data.sim_config.scale == 0.05
    assert wb.scheduler is None  # no address: the runs train on this machine
    assert wb.label == "iemocap_unaligned [synthetic (simulator)]"


def test_headless_kernel_runs_without_the_tcp_warning(tmp_path, capfd):
    # make reproduce printed ipykernel's "running over TCP without encryption" for every notebook: the kernel
    # now talks over IPC
    import nbformat

    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")]), tmp_path / "a.ipynb")
    execute_notebook(tmp_path / "a.ipynb", tmp_path / "b.ipynb", timeout=60)
    assert nbformat.read(tmp_path / "b.ipynb", 4).cells[0].outputs[0]["text"] == "42\n"
    captured = capfd.readouterr()
    assert "without encryption" not in captured.out + captured.err
