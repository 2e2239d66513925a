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
