"""The command line: what it prints and how it fails."""

import json
import subprocess
import sys

import pytest

from ktlib.__main__ import main
from ktlib.simulate import REGIMES


def test_data_command_prints_real_file_summary(mosi_fixture_path, capsys):
    assert main(["data", "--file", str(mosi_fixture_path)]) == 0
    out = capsys.readouterr().out
    assert "mosi_utterance [real]: train 1284 / valid 229 / test 686" in out
    assert "l 1x100, a 1x73, v 1x100" in out
    assert "labels test  [real]" in out


def test_data_command_on_simulator_says_synthetic(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path))
    assert main(["data", "--dataset", "iemocap", "--source", "simulated", "--scale", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "iemocap_aligned [synthetic (simulator)]" in out
    assert "noise ceiling on test" in out
    assert "happy" in out  # class shares per emotion
    assert list((tmp_path / "sim").glob("iemocap_aligned_*.pkl")), "the simulation is cached under $KTLIB_DATA_DIR/sim"


def test_missing_real_file_exits_2_with_guidance(tmp_path, capsys):
    code = main(["data", "--dataset", "mosei", "--alignment", "unaligned", "--source", "real",
                 "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "mosei_senti_data_noalign.pkl" in err and str(tmp_path) in err
    assert "data/README.md" in err and "12000 MB" in err


def test_bad_knob_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path))
    assert main(["data", "--source", "simulated", "--audio-shared", "1.5"]) == 2
    assert "audio_shared must lie in [0, 1]" in capsys.readouterr().err


def test_unknown_regime_is_refused_by_the_parser(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--source", "simulated", "--regime", "no_such_regime"])
    assert exit_info.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert "--regime" in err and "labels_bottleneck" in err  # the valid choices are listed


def test_regime_sets_its_knobs_and_audio_shared_overrides(tmp_path, monkeypatch, capsys):
    # --regime labels_bottleneck: noisy labels and a quarter of the training set; --audio-shared on top of it.
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path))
    args = ["data", "--dataset", "mosi", "--source", "simulated", "--scale", "0.02", "--seed", "5"]
    assert main([*args, "--regime", "labels_bottleneck", "--audio-shared", "0.3"]) == 0
    capsys.readouterr()
    metas = [json.loads(p.read_text()) for p in (tmp_path / "sim").glob("mosi_aligned_*.json")]
    assert len(metas) == 1
    config = metas[0]["config"]
    assert config["annotator_noise"] == REGIMES["labels_bottleneck"]["annotator_noise"] == 1.5
    assert config["train_scale"] == REGIMES["labels_bottleneck"]["train_scale"] == 0.25
    assert config["audio_shared"] == 0.3 and config["seed"] == 5 and config["scale"] == 0.02


def test_module_entry_point_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "ktlib", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("data", "simulate", "reproduce"):
        assert command in out
