"""The benchmark times training steps in fresh processes, compares two checkouts pair by pair, and prints a table
of every setting with a ratio to the reference path.  Figures are printed and parsed here, never judged."""

import re
from pathlib import Path

import pytest

from ktlib.bench import STEPS, VARIANTS, main, measure_step, synthetic_batch
from ktlib.config import model_config

ROOT = Path(__file__).resolve().parent.parent


def test_synthetic_batch_is_front_padded_with_the_config_shapes():
    cfg = model_config("mosi", "unaligned")
    batch = synthetic_batch(cfg, 4)
    for m in ("l", "a", "v"):
        assert batch[m].shape == (4, cfg.seq_lens[m], cfg.feature_dims[m])
        pad = batch[f"mask_{m}"]
        assert pad.equal(~(batch[m] != 0).any(-1))  # padding is exactly the all-zero frames
        assert (pad.int().diff(dim=1) <= 0).all()  # at the front


def test_word_count_batch_has_one_short_length_per_sample():
    cfg = model_config("mosi", "aligned")
    batch = synthetic_batch(cfg, 200, words=True)
    pads = [batch[f"mask_{m}"] for m in ("l", "a", "v")]
    assert pads[0].equal(pads[1]) and pads[0].equal(pads[2])  # word-aligned: every modality has the sample's length
    real = (~pads[0]).sum(1).float()
    assert real.min() >= 1 and real.max() <= cfg.seq_lens["l"]
    assert 9 < real.mean() < 16  # the simulator's MOSI: 3.5 s median at about 3 words per second
    assert pads[0].equal(~(batch["l"] != 0).any(-1))  # padding is exactly the all-zero frames


def test_benchmark_prints_times_memory_and_the_ratio_to_reference(capsys):
    assert main(["--table", "--alignments", "aligned", "--settings", "language_only", "--variants", "reference",
                 "fused", "--steps", "1", "--batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "paper config (d=40, 4 layers, 10 heads), batch 4" in out
    lines = [line for line in out.splitlines() if line.strip().startswith("aligned") and "language_only" in line]
    table_rows = [line for line in lines if "s/batch" not in line]
    assert len(table_rows) == 2
    for row in table_rows:
        numbers = [float(x) for x in row.split()[3:]]
        assert all(x == x for x in numbers[:4]) and min(numbers[:4]) > 0  # times and samples/s are positive
    assert "train_speedup_vs_reference" in out
    assert set(VARIANTS) == {"reference", "fused", "fused+keydrop"}


def test_benchmark_rejects_unknown_choices():
    with pytest.raises(SystemExit):
        main(["--variants", "turbo"])
    with pytest.raises(SystemExit):
        main(["--cases", "huge"])


def test_step_measurement_reports_times_and_memory():
    r = measure_step("quick", steps=2, warmup=1, device="cpu")
    assert r["case"] == "quick" and r["device"] == "cpu" and r["batch_size"] == STEPS["quick"][2]
    assert len(r["ms_all"]) == 2 and min(r["ms_all"]) <= r["ms"] <= max(r["ms_all"]) and r["ms"] > 0
    assert r["peak_mb"] == r["peak_mb"]  # a number (the growth of the peak resident set may be 0)


def test_benchmark_prints_the_step_time_of_each_case(capsys):
    assert main(["--cases", "quick", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "kt training step" in out
    assert re.search(r"quick .*\(quick profile, aligned, batch 48\) +[0-9.]+ ms/step", out)


def test_paired_comparison_with_another_checkout(capsys, tmp_path):
    # this tree against itself: two fresh processes per round, each importing the ktlib of its tree
    assert main(["--cases", "quick", "--steps", "1", "--warmup", "0", "--device", "cpu", "--compare", str(ROOT),
                 "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"quick .*ms/step .*ratio [0-9.]+ \[[0-9.]+, [0-9.]+\]", out)
    with pytest.raises(SystemExit):  # not a checkout
        main(["--compare", str(tmp_path)])


def test_kernel_table_times_both_paths_of_each_case(monkeypatch, capsys):
    """``--kernels`` pairs the compiled kernels with the PyTorch paths: each round runs both, the PyTorch one with
    the kernels turned off (ExplicitAttention and the mask of ``dropout_mask`` serve it)."""
    import ktlib.bench as bench
    import ktlib.layers as layers
    from ktlib import kernels

    if not kernels.available():
        pytest.skip(f"compiled kernels {kernels.status()}")
    monkeypatch.setattr(bench, "KERNEL_CASES", [("tiny", 2, 2, 5, 7, 4, 0.1, False), ("tiny causal", 2, 2, 6, 6, 8,
                                                                                      0.0, True)])
    monkeypatch.setattr(bench, "DROPOUT_CASES", [("tiny", (3, 4), 0.2)])
    calls = {"compiled": 0, "explicit": 0, "pytorch dropout": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kernels, "attention", counting("compiled", kernels.attention))
    monkeypatch.setattr(layers.ExplicitAttention, "apply", counting("explicit", layers.ExplicitAttention.apply))
    monkeypatch.setattr(layers, "dropout_mask", counting("pytorch dropout", layers.dropout_mask))
    assert main(["--kernels", "--rounds", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"PyTorch +[\d.]+ ms +compiled +[\d.]+ ms +ratio [\d.]+ \[[\d.]+, [\d.]+\]", out)) == 3
    per_path = 2 * 2 * (1 + 3)  # attention cases x rounds x (one untimed + three timed calls)
    assert calls["compiled"] == calls["explicit"] == per_path
    assert calls["pytorch dropout"] == 2 * 4 + 2 * 4 * 1  # the dropout case, and the attention case with p > 0
    assert kernels.available()  # turned on again after the comparison


def test_the_kernels_are_ready_before_a_step_is_timed(monkeypatch, tmp_path):
    """The estimate before a long grid times one step: building the kernels (seconds, once) must not be in it."""
    import ktlib.bench as bench
    from ktlib import kernels

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("KTLIB_KERNEL_CACHE", str(tmp_path))
    cfg = model_config("mosi", "aligned", setting="kt", d=8, layers=1, heads=2)
    from ktlib.train import TrainConfig

    bench.training_step(cfg, TrainConfig(batch_size=4), 4, device="cpu")
    assert "lib" in kernels._state  # built or found before training_step returned: no step has run yet
