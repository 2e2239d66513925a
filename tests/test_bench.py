"""The benchmark runs each measurement in its own process and prints a table with a ratio to the reference path."""

import pytest

from ktlib.bench import VARIANTS, main, synthetic_batch
from ktlib.model import ModelConfig


def test_synthetic_batch_is_front_padded_with_the_config_shapes():
    cfg = ModelConfig.for_layout("mosi", "unaligned")
    batch = synthetic_batch(cfg, 4)
    for m in ("l", "a", "v"):
        assert batch[m].shape == (4, cfg.seq_lens[m], cfg.feature_dims[m])
        pad = batch[f"mask_{m}"]
        assert pad.equal(~(batch[m] != 0).any(-1))  # padding is exactly the all-zero frames
        assert (pad.int().diff(dim=1) <= 0).all()  # at the front


def test_benchmark_prints_times_memory_and_the_ratio_to_reference(capsys):
    assert main(["--alignments", "aligned", "--settings", "language_only", "--variants", "reference", "fused",
                 "--steps", "1", "--batch-size", "4", "--device", "cpu"]) == 0
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
