"""The answers notebooks 3-7 close with: sentences built from the numbers, labelled with the kind of data."""

import pandas as pd

from ktlib import answers


def _main(maes: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"setting": s, "seed": seed, "split": "test", "metric": "mae", "value": v}
                         for s, values in maes.items() for seed, v in enumerate(values, start=1)])


def test_training_answer_reads_the_paired_verdict_and_the_gap_to_full():
    main = _main({"kt": [0.80, 0.82, 0.81], "language_vision": [0.90, 0.93, 0.91], "full": [0.70, 0.71, 0.72]})
    text = answers.training(main, "mae", "synthetic (simulator)")
    assert text.startswith("[synthetic (simulator)] Does kt beat language+vision")
    assert "Yes: over 3 seeds kt's test mae is 0.810 against language+vision's 0.913 and full's 0.710" in text
    assert "on 3/3 seeds: supported" in text and "kt closes 51% of the gap" in text
    worse_full = _main({"kt": [0.80, 0.82], "language_vision": [0.81, 0.80], "full": [0.95, 0.99]})
    text = answers.training(worse_full, "mae", "real")
    assert text.startswith("[real]") and "no gap for kt to close" in text


def test_ablation_and_robustness_answers_rank_best_first_with_the_sample_std():
    tidy = pd.DataFrame([{"variant": v, "seed": 1, "split": "test", "metric": "mae", "value": x}
                         for v, x in (("L1", 0.9), ("L2", 0.8))])
    text = answers.ablations({"consistency": tidy}, "mae", "synthetic (simulator)")
    assert "- consistency: L2 0.800 ± n/a, then L1 0.900 ± n/a (one seed each" in text
    scores = pd.DataFrame([{"kind": "fixed", "level": "a", "method": m, "seed": seed, "metric": "corr", "value": x}
                           for m, xs in (("MulT (zero-fill)", (0.1, 0.3)), ("kt (any modality)", (0.5, 0.7)))
                           for seed, x in enumerate(xs)])
    auilc = pd.DataFrame({"kind": ["frame"] * 2, "phase": ["train_test"] * 2, "metric": ["corr"] * 2,
                          "method": ["MulT (zero-fill)", "kt (any modality)"], "mean": [0.2, 0.4],
                          "std": [0.1, 0.1], "seeds": [2, 2]})
    text = answers.robustness(scores, auilc, "corr", "synthetic (simulator)")
    assert "kt (any modality) 0.600 ± 0.141, then MulT (zero-fill) 0.200 ± 0.141" in text
    assert "frame-level missing at train and test, AUILC in corr: kt (any modality) 0.400 ± 0.100" in text
    assert text.count("mean ± sample std (ddof=1) over 2 seeds") == 2
