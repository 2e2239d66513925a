"""Beyond the paper: knowledge transfer for any missing modality, missing data in training, the distillation
student, and robustness curves with AUILC.

Checked here: every modality can be reconstructed; a model never reads an input it is told is missing (poisoned
rows change nothing); the distillation student never reads missing inputs at test time and carries no teacher;
training-time masks have the stated rates and keep one modality; AUILC tables on hand-worked curves.
"""

from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest
import torch

from ktlib import experiments as E
from ktlib.config import model_config, profile
from ktlib.data import load_simulated, make_loader
from ktlib.missing import Protocol, narrow, subset_presence
from ktlib.model import KT_SOURCES, KTModel
from ktlib.runs import Run, load_or_train, run_id
from ktlib.simulate import preset
from ktlib.specs import MODALITIES
from ktlib.train import TrainConfig, distillation_loss, eval_loader, evaluate, fit, train_allowed

SMOKE = profile("smoke")


@pytest.fixture(scope="module")
def unaligned(tmp_path_factory):
    return load_simulated(preset("mosi", "unaligned", scale=0.02), cache_dir=tmp_path_factory.mktemp("sim"))


def _model(data, setting, seed=0, **overrides):
    torch.manual_seed(seed)
    return KTModel(model_config(data.layout, setting=setting, **{**SMOKE.model, **overrides}))


def _batch(data, n=12, present=None, split="test"):
    """The first n samples of a split; ``present`` (n, 3) marks what they have."""
    full = np.ones((len(data[split]), 3), dtype=bool)
    if present is not None:
        full[:n] = present
    return next(iter(make_loader(data, split, n, shuffle=False, missing=full)))


def _presence(n):
    """A presence matrix with every non-empty pattern: rows cycle through the 7 subsets of (l, a, v)."""
    codes = np.arange(n) % 7 + 1
    return (codes[:, None] >> np.arange(3)[None, :]) & 1 == 1


# ----------------------------------------------------------------------------------------------------------------
# Training-time masks


def test_subset_presence_draws_the_seven_patterns_uniformly():
    p = subset_presence(7000, [1, 2])
    assert p.shape == (7000, 3) and p.dtype == bool and p.any(axis=1).all()
    codes = (p * np.array([1, 2, 4])).sum(1)
    counts = np.bincount(codes, minlength=8)
    assert counts[0] == 0 and np.allclose(counts[1:] / 7000, 1 / 7, atol=0.015)
    assert np.allclose(1 - p.mean(0), 3 / 7, atol=0.02)  # each modality missing 3/7 of the time
    assert np.array_equal(p, subset_presence(7000, [1, 2])) and not np.array_equal(p, subset_presence(7000, [1, 3]))


def test_narrow_keeps_the_intersection_or_what_is_present():
    present = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=bool)
    keep = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=bool)
    assert narrow(present, keep).tolist() == [[True, False, False], [True, False, True], [False, True, False]]


def test_train_allowed_follows_the_protocol_phase_and_the_subsets():
    base = TrainConfig(**SMOKE.train, seed=3)
    assert train_allowed(base, 50, 0) is None
    assert train_allowed(replace(base, protocol=Protocol("modality", rate=0.5)), 50, 0) is None  # test only
    trained = replace(base, protocol=Protocol("modality", rate=0.5, phase="train_test"))
    keep = train_allowed(trained, 4000, 0)
    assert abs((1 - keep.mean()) - (0.5 - 0.5**3 / 3)) < 0.02 and keep.any(axis=1).all()
    assert not np.array_equal(keep, train_allowed(trained, 4000, 1))  # fresh masks every epoch
    assert np.array_equal(keep, train_allowed(trained, 4000, 0))  # reproducible
    both = train_allowed(replace(trained, train_drop="subsets"), 4000, 0)
    assert both.any(axis=1).all() and not (both & ~keep).any()  # a narrowing of the protocol's pattern
    fixed = train_allowed(replace(base, protocol=Protocol("fixed", modalities=("a",), phase="train_test")), 10, 0)
    assert fixed.tolist() == [[True, False, True]] * 10


def test_train_config_checks_distillation_and_round_trips_the_protocol():
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(distill_pred=1.0)
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(teacher="some-run")
    with pytest.raises(ValueError, match="train_drop"):
        TrainConfig(train_drop="sometimes")
    with pytest.raises(ValueError, match="distill_rep"):
        TrainConfig(distill_rep=-1.0, teacher="x")
    with pytest.raises(ValueError, match="protocol"):
        TrainConfig(protocol="modality")
    cfg = TrainConfig(protocol=Protocol("fixed", modalities=("v", "a"), phase="train_test"))
    assert TrainConfig(**asdict(cfg)) == cfg and cfg.protocol.modalities == ("a", "v")


# ----------------------------------------------------------------------------------------------------------------
# Knowledge transfer for any missing modality


@pytest.mark.parametrize("fixture", ["mosi", "unaligned"])
def test_kt_any_reconstructs_each_missing_modality(request, fixture):
    data = request.getfixturevalue(fixture)
    model = _model(data, "kt_any").eval()
    for j, m in enumerate(MODALITIES):
        present = np.ones((12, 3), dtype=bool)
        present[::2, j] = False  # every other sample lacks m
        with torch.no_grad():
            out, details = model(_batch(data, present=present), return_details=True)
        assert out.shape == (12, 1) and torch.isfinite(out).all()
        hat = details[f"f_{m}_hat"]
        assert hat.shape == (12, data.layout.seq_lens[m], model.cfg.d) and torch.isfinite(hat).all()
        assert {f"f_{t}_hat" for t in MODALITIES} & set(details) == {f"f_{m}_hat"}  # only what is lacking
        for s in KT_SOURCES[m]:
            assert details[f"{m}_from_{s}"].shape == hat.shape
    with torch.no_grad():
        _, details = model(_batch(data), return_details=True)
    assert not any(k.endswith("_hat") for k in details)  # complete data: nothing to rebuild


def test_kt_any_trains_every_reconstruction_from_real_pairs_only(mosi):
    model = _model(mosi, "kt_any").train()
    present = np.ones((12, 3), dtype=bool)
    out, details = model(_batch(mosi, present=present, split="train"), return_details=True)
    losses = {f"loss_{s}{t}" for t, pair in KT_SOURCES.items() for s in pair}
    assert losses <= set(details) and all(details[k] > 0 for k in losses)
    model.consistency_term(details).backward()
    for t in MODALITIES:
        rec = model.kt.recon[t]
        assert rec.theta.layers[0].attn.in_proj_weight.grad.abs().sum() > 0
        assert rec.phi.layers[0].attn.in_proj_weight.grad.abs().sum() > 0
    no_audio = present.copy()
    no_audio[:, 1] = False  # no real audio anywhere: nothing supervises the audio's reconstruction ...
    _, details = model(_batch(mosi, present=no_audio, split="train"), return_details=True)
    assert details["loss_va"].item() == 0.0 and details["loss_la"].item() == 0.0
    assert details["loss_av"].item() == 0.0 and details["loss_al"].item() == 0.0  # ... nor anything from it
    assert details["loss_lv"].item() > 0


def test_kt_any_simulated_missing_uses_the_reconstruction_but_supervises_with_the_real(mosi):
    model = _model(mosi, "kt_any").train()
    batch = _batch(mosi, split="train")
    keep = torch.ones(12, 3, dtype=torch.bool)
    keep[:, 1] = False  # audio dropped for the backbone, still real
    torch.manual_seed(0)
    _, details = model(dict(batch, allowed=keep), return_details=True)
    assert details["loss_va"] > 0  # the real audio is the target
    torch.manual_seed(0)
    out_poisoned = model.eval()(dict(batch, allowed=keep, a=torch.full_like(batch["a"], float("nan"))))
    torch.manual_seed(0)
    out = model(dict(batch, allowed=keep))
    assert torch.equal(out, out_poisoned)  # the backbone never reads the dropped audio


@pytest.mark.parametrize("setting", ["full", "kt_any", "kt", "language_vision"])
def test_missing_rows_are_never_read(mosi, setting):
    model = _model(mosi, setting).eval()
    present = _presence(14)
    batch = _batch(mosi, n=14, present=present)
    poisoned = dict(batch)
    for j, m in enumerate(MODALITIES):
        x = batch[m].clone()
        x[~torch.from_numpy(present[:, j])] = float("nan")
        poisoned[m] = x
    with torch.no_grad():
        a, b = model(batch), model(poisoned)
    assert torch.isfinite(a).all() and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Distillation


def test_distillation_loss_by_hand():
    cfg = TrainConfig(distill_pred=2.0, distill_rep=0.5, teacher="t")
    out, t_out = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])  # MSE (1 + 4) / 2 = 2.5
    pooled, t_pooled = torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [3.0, 1.0]])  # MSE (1 + 1 + 9 + 1) / 4 = 3
    assert distillation_loss(out, pooled, t_out, t_pooled, cfg).item() == pytest.approx(2 * 2.5 + 0.5 * 3)


@pytest.fixture(scope="module")
def distilled(mosi, tmp_path_factory):
    """A smoke teacher (MulT on complete data) and its distillation student, in a private store."""
    store = tmp_path_factory.mktemp("store")
    jobs = E.robustness_jobs(mosi, [1], "smoke", "distillation")
    for job in jobs:
        job.train = replace(job.train, device="cpu")
    teacher_job, student_job = jobs
    student_job.train = replace(student_job.train, teacher=run_id(teacher_job.model, teacher_job.train, mosi))
    with pytest.raises(FileNotFoundError, match=r"\(teacher\) is not finished"):
        load_or_train(student_job.model, student_job.train, mosi, store, progress=False)
    teacher = load_or_train(teacher_job.model, teacher_job.train, mosi, store, progress=False)
    student = load_or_train(student_job.model, student_job.train, mosi, store, progress=False)
    return teacher, student


def test_distillation_student_learns_from_the_teacher_and_carries_none_of_it(distilled):
    teacher, student = distilled
    assert student.config["train"]["teacher"] == teacher.id
    assert (student.history["train_distill"] > 0).all() and (teacher.history["train_distill"] == 0).all()
    keys = set(student.load_model().state_dict())
    assert keys == set(teacher.load_model().state_dict())  # the same MulT, no teacher weights inside


def test_distillation_student_never_reads_missing_inputs_at_test(distilled, mosi):
    _, student = distilled
    model = student.load_model()
    for protocol in (Protocol("fixed", modalities=("a",)), Protocol("modality", rate=0.6)):
        present = protocol.presence(len(mosi["test"]), "test")
        poisoned = replace(mosi, splits=dict(mosi.splits))
        test = mosi["test"]
        arrays = {m: test.features(m).copy() for m in MODALITIES}
        for j, m in enumerate(MODALITIES):
            arrays[m][~present[:, j]] = np.nan  # anything read from a missing entry would poison the prediction
        poisoned.splits["test"] = replace(test, l=arrays["l"], a=arrays["a"], v=arrays["v"])
        loader = eval_loader(poisoned, "test", 16, "full", protocol)
        _, metrics, pred = evaluate(model, loader, torch.device("cpu"), protocol=protocol)
        _, _, clean = evaluate(model, eval_loader(mosi, "test", 16, "full", protocol), torch.device("cpu"),
                               protocol=protocol)
        assert np.isfinite(pred).all() and np.array_equal(pred, clean)


def test_fit_refuses_a_teacher_without_its_run_id(mosi):
    model_cfg = model_config(mosi.layout, setting="full", **SMOKE.model)
    with pytest.raises(ValueError, match="distillation needs both"):
        fit(model_cfg, TrainConfig(**SMOKE.train, device="cpu"), mosi, progress=False, teacher=KTModel(model_cfg))


# ----------------------------------------------------------------------------------------------------------------
# Robustness curves and AUILC


def test_auilc_table_by_hand():
    rows = []
    for seed, values in ((1, (1.0, 0.5, 0.0)), (2, (1.0, 1.0, 1.0))):  # areas 0.5 and 1.0
        for rate, value in zip((0.0, 0.5, 1.0), values, strict=True):
            rows.append({"data": "synthetic (simulator)", "method": "m", "kind": "modality", "phase": "test",
                         "rate": rate, "seed": seed, "metric": "mae", "value": value})
    rows.append({**rows[0], "kind": "fixed", "rate": np.nan, "value": 99.0})  # no rate: left out
    for rate, value in ((0.0, 0.6), (0.5, 0.2), (1.0, np.nan)):  # corr of constant predictions counts as 0
        rows.append({**rows[0], "metric": "corr", "rate": rate, "value": value})
    table = E.auilc_table(pd.DataFrame(rows)).set_index("metric")
    assert table.loc["mae", "mean"] == pytest.approx(0.75)
    assert table.loc["mae", "std"] == pytest.approx(np.sqrt(0.125))  # sample std (ddof=1) of 0.5 and 1.0
    assert table.loc["mae", "seeds"] == 2
    assert table.loc["corr", "mean"] == pytest.approx((0.6 + 0.2) / 4 + (0.2 + 0.0) / 4)


def test_robustness_runs_score_every_method_protocol_and_rate(mosi, tmp_path, monkeypatch):
    monkeypatch.setenv("KTLIB_RUNS_DIR", str(tmp_path))
    kw = dict(seeds=[1], profile_name="smoke", workers=2, progress=False)  # training and scoring in 2 processes
    tidy = E.robustness_runs(mosi, kinds=("fixed", "modality"), rates=(0.0, 1.0), **kw)
    mae = tidy[tidy["metric"] == "mae"]
    assert set(mae["method"]) == set(E.METHODS) and np.isfinite(mae["value"]).all()
    assert len(mae) == len(E.METHODS) * (len(E.FIXED) + 2)
    assert set(mae[mae["kind"] == "fixed"]["level"]) == {"+".join(m) for m in E.FIXED}
    assert (tidy["data"] == "synthetic (simulator)").all()
    assert len(list(tmp_path.glob("*/metrics.json"))) == 3  # MulT (also the teacher), kt_any, the student
    assert all((p.parent / "scores.json").exists() for p in tmp_path.glob("*/metrics.json"))
    again = E.robustness_runs(mosi, kinds=("fixed", "modality"), rates=(0.0, 1.0), **kw)
    pd.testing.assert_frame_equal(tidy, again)  # read back, not retrained
    # at rate 0 the same model at test only; at rate 0.5 missing at train and test trains new runs
    both = E.robustness_runs(mosi, kinds=("modality",), phase="train_test", rates=(0.0, 0.5), **kw)
    zero = both[(both["rate"] == 0.0) & (both["metric"] == "mae")].set_index("method")["value"]
    ref = tidy[(tidy["kind"] == "modality") & (tidy["rate"] == 0.0) & (tidy["metric"] == "mae")]
    assert zero.to_dict() == ref.set_index("method")["value"].to_dict()
    assert len(list(tmp_path.glob("*/metrics.json"))) == 6
    half = both[(both["rate"] == 0.5)]["run"].unique()
    for rid in half:
        protocol = Run.load(tmp_path / rid).config["train"]["protocol"]
        assert protocol["kind"] == "modality" and protocol["rate"] == 0.5 and protocol["phase"] == "train_test"


def test_robustness_runs_refuse_an_unknown_phase(mosi):
    with pytest.raises(ValueError, match="phase"):
        E.robustness_runs(mosi, [1], "smoke", phase="sometimes")


def test_robustness_runs_on_the_real_mosi_fixture(mosi_fixture_path, tmp_path, monkeypatch):
    from ktlib.data import get_data

    monkeypatch.setenv("KTLIB_RUNS_DIR", str(tmp_path))
    data = get_data("mosi_utterance", "aligned", data_dir=mosi_fixture_path.parent)
    tidy = E.robustness_runs(data, [1], "smoke", kinds=("modality", "frame"), rates=(0.0, 0.5, 1.0), workers=1,
                             progress=False)
    mae = tidy[tidy["metric"] == "mae"]
    assert tidy["data"].str.startswith("real fixture mosi_utterance (").all()  # named, with its caveat
    assert tidy["data"].str.contains("leak").all() and len(mae) == len(E.METHODS) * 2 * 3
    assert np.isfinite(mae["value"]).all()
    assert np.isfinite(E.auilc_table(tidy)["mean"]).all()
