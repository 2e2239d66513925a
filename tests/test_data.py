"""Tests of ktlib.data: the real MOSI fixture, malformed and unsafe files, non-finite values, missing files and the
simulator fallback, the simulation cache, and the batches served to PyTorch (masks, padding, presence).

Malformed files are built from a small simulated dict in the MulT layout, damaged one way at a time, and written
into pytest's tmp_path; nothing here writes to the project's data/ folder.
"""

import collections
import copy
import datetime
import functools
import os
import pickle
import re

import numpy as np
import pytest
import torch

import ktlib.data
from ktlib.data import (
    DataFileError,
    DataFileNotFound,
    MultimodalData,
    MultimodalDataset,
    NonFiniteValuesWarning,
    SplitData,
    UnsafePickleError,
    find_data_file,
    get_data,
    load_mult_file,
    load_simulated,
    make_loader,
    presence_matrix,
    read_pickle_safely,
    sha256sum,
    simulation_cache_paths,
    validate_raw,
)
from ktlib.simulate import preset, simulate
from ktlib.specs import FILE_KEYS, LAYOUTS, MODALITIES, MOSI_UTTERANCE, SPLITS, get_layout

SIZES = {"train": 26, "valid": 8, "test": 14}  # preset(..., scale=0.02).split_sizes() for MOSI and IEMOCAP


@functools.cache
def _small_sim(dataset: str = "mosi", alignment: str = "aligned"):
    return simulate(preset(dataset, alignment, scale=0.02))


def _small_raw(dataset: str = "mosi", alignment: str = "aligned") -> dict:
    """A fresh deep copy of a small, valid MulT-layout dict, safe to damage."""
    return copy.deepcopy(_small_sim(dataset, alignment).raw)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


# ---------------------------------------------------------------------------------------------------------
# The real MOSI utterance-level fixture


def test_real_fixture_loads_with_the_layout_inferred_from_its_name(mosi_fixture_path):
    data = load_mult_file(mosi_fixture_path)
    assert data.layout.name == "mosi_utterance"
    assert data.layout is MOSI_UTTERANCE
    assert data.synthetic is False and data.kind == "real"
    assert data.source == str(mosi_fixture_path)
    assert data.nonfinite == {}
    assert data.task == "regression"
    assert {s: len(d) for s, d in data.splits.items()} == {"train": 1284, "valid": 229, "test": 686}
    for split, d in data.splits.items():
        n = len(d)
        assert d.l.shape == (n, 1, 100) and d.a.shape == (n, 1, 73) and d.v.shape == (n, 1, 100), split
        assert d.labels.shape == (n, 1, 1)
        for m in MODALITIES:
            assert d.features(m).dtype == np.float32
        assert d.labels.dtype == np.float32
        assert d.labels.min() >= -3 and d.labels.max() <= 3
        assert d.ids.shape == (n,) and d.ids.dtype.kind == "U"
        assert all(isinstance(i, str) and re.fullmatch(r"[\w-]+_\d+", i) for i in d.ids.tolist())
    assert data["train"].ids[0] == "2iD-tVS8NPw_1"  # as documented in shared/data/mosi_utterance/README.md
    all_ids = np.concatenate([d.ids for d in data.splits.values()])
    assert len(set(all_ids)) == 2199  # the standard folds do not overlap
    assert "mosi_utterance [real]: train 1284 / valid 229 / test 686" in data.describe()


def test_real_fixture_checksum_matches_the_spec(mosi_fixture_path):
    assert sha256sum(mosi_fixture_path) == MOSI_UTTERANCE.sha256
    assert sha256sum(mosi_fixture_path, chunk=4096) == MOSI_UTTERANCE.sha256  # independent of the chunk size


# ---------------------------------------------------------------------------------------------------------
# Malformed files: each case damages one thing and names where it is and what was expected.


def _drop_split(raw):
    del raw["valid"]
    return raw


def _drop_audio(raw):
    del raw["train"]["audio"]
    return raw


def _audio_width_6(raw):
    raw["test"]["audio"] = np.ones((14, 50, 6), dtype=np.float32)
    return raw


def _vision_2d(raw):
    raw["train"]["vision"] = raw["train"]["vision"][:, -1, :]
    return raw


def _labels_one_row_short(raw):
    raw["train"]["labels"] = raw["train"]["labels"][:-1]
    return raw


def _nan_label(raw):
    raw["valid"]["labels"][3, 0, 0] = np.nan
    return raw


def _top_level_list(raw):
    return [raw["train"], raw["valid"], raw["test"]]


def _split_not_a_dict(raw):
    raw["valid"] = list(raw["valid"].values())
    return raw


def _text_as_list(raw):
    raw["train"]["text"] = raw["train"]["text"].tolist()
    return raw


def _text_as_strings(raw):
    raw["train"]["text"] = np.full((26, 50, 300), "x")
    return raw


def _iemocap_labels_in_mosi(raw):
    raw["train"]["labels"] = np.zeros((26, 4, 2), dtype=np.float32)
    return raw


def _ids_one_short(raw):
    raw["test"]["id"] = raw["test"]["id"][:-1]
    return raw


def _empty_split(raw):
    raw["valid"] = {key: x[:0] for key, x in raw["valid"].items()}
    return raw


def _vision_two_rows_short(raw):
    raw["test"]["vision"] = raw["test"]["vision"][:-2]
    return raw


def _labels_out_of_range(raw):
    raw["train"]["labels"][5, 0, 0] = 9.0
    raw["train"]["labels"][7, 0, 0] = -3.5
    return raw


def _inf_label(raw):
    raw["test"]["labels"][0, 0, 0] = -np.inf
    return raw


def _id_a_single_value(raw):
    raw["test"]["id"] = "one-id-for-all"
    return raw


MALFORMED = {
    "missing-split": (_drop_split, r"top level: missing split\(s\) \['valid'\]; "
                                   r"expected \['train', 'valid', 'test'\], found \['test', 'train'\]"),
    "missing-key": (_drop_audio, r"split 'train': missing key\(s\) \['audio'\]; "
                                 r"expected \['text', 'audio', 'vision', 'labels'\] \(\+ optional 'id'\)"),
    "wrong-width": (_audio_width_6, r"split 'test', key 'audio': expected shape \(N, 50, 5\) for mosi_aligned, "
                                    r"found \(14, 50, 6\)"),
    "2-d-array": (_vision_2d, r"split 'train', key 'vision': expected a 3-D array \(N, T, D\), found shape "
                              r"\(26, 20\)"),
    "mismatched-rows": (_labels_one_row_short, r"split 'train', key 'labels': has 25 rows but 'text' has 26; "
                                               r"every key of a split must have one row per utterance"),
    "nan-label": (_nan_label, r"split 'valid', key 'labels': 1 of 8 row\(s\) have a NaN/inf label \(e\.g\. row 3: "
                              r"nan\)\. Labels must be finite: download the file again"),
    "inf-label": (_inf_label, r"split 'test', key 'labels': 1 of 14 row\(s\) have a NaN/inf label \(e\.g\. row 0: "
                              r"-inf\)"),
    "empty-split": (_empty_split, r"split 'valid': is empty \(0 rows in \['text', 'audio', 'vision', 'labels'\]\); "
                                  r"every split needs at least one utterance\. The file was cut short when it was "
                                  r"made or copied: download it again \(data/README\.md\), or rebuild it with at "
                                  r"least one utterance in each of train, valid and test\."),
    "modality-rows": (_vision_two_rows_short, r"split 'test', key 'vision': has 12 rows but 'text' has 14"),
    "label-range": (_labels_out_of_range, r"split 'train', key 'labels': 2 of 26 row\(s\) are outside \[-3, 3\], "
                                          r"the range of mosi_aligned sentiment labels \(e\.g\. row 5: 9\.0\)\. "
                                          r"Such labels are not CMU-MOSI/MOSEI sentiment scores: download the file "
                                          r"again \(data/README\.md\), or rescale labels of another scale to "
                                          r"\[-3, 3\]"),
    "id-single-value": (_id_a_single_value, r"split 'test', key 'id': expected 14 ids, found a single value; a split "
                                            r"needs one id per row \(or no 'id' key at all\)"),
    "top-level-list": (_top_level_list, r"top level: expected a dict with keys \['train', 'valid', 'test'\], "
                                        r"found list"),
    "split-not-dict": (_split_not_a_dict, r"split 'valid': expected a dict, found list"),
    "not-an-array": (_text_as_list, r"split 'train', key 'text': expected a numpy array, found list"),
    "strings": (_text_as_strings, r"split 'train', key 'text': expected numbers, found dtype <U1"),
    "label-shape": (_iemocap_labels_in_mosi, r"split 'train', key 'labels': expected shape \(N, 1, 1\), "
                                             r"found \(26, 4, 2\)"),
    "ids-short": (_ids_one_short, r"split 'test', key 'id': expected 14 ids, found 13"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_refused_naming_file_split_key_and_shapes(tmp_path, case):
    damage, pattern = MALFORMED[case]
    path = _write_pickle(tmp_path / "mosi_data.pkl", damage(_small_raw()))  # the name selects mosi_aligned
    with pytest.raises(DataFileError, match=pattern) as info:
        load_mult_file(path)
    assert str(info.value).startswith(f"{path}: ")  # the file comes first
    assert not isinstance(info.value, UnsafePickleError)


NEUTRAL = [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]  # (no, yes) per emotion: neutral, not happy/sad/angry


def _not_one_hot(row, emotion, pair):
    def damage(raw):
        raw["train"]["labels"][:] = NEUTRAL  # a known valid row everywhere
        raw["train"]["labels"][row, emotion] = pair
        return raw

    bad = [list(p) for p in NEUTRAL]
    bad[emotion] = [float(x) for x in pair]
    return damage, row, bad


NOT_ONE_HOT = {
    "both-yes-and-no": _not_one_hot(2, 1, (1, 1)),
    "neither": _not_one_hot(4, 0, (0, 0)),
    "probabilities": _not_one_hot(6, 3, (0.3, 0.7)),
    "class-number": _not_one_hot(8, 2, (0, 2)),
}


@pytest.mark.parametrize("name", ["iemocap_data.pkl", "custom_iemocap.pkl"], ids=["layout", "no-layout"])
@pytest.mark.parametrize("case", list(NOT_ONE_HOT))
def test_iemocap_label_row_that_is_not_one_hot_per_emotion_is_refused(tmp_path, case, name):
    damage, row, value = NOT_ONE_HOT[case]
    raw = damage(_small_raw("iemocap"))
    path = _write_pickle(tmp_path / name, raw)
    n = len(raw["train"]["labels"])
    expected = (f"{path}: split 'train', key 'labels': 1 of {n} row(s) are not one-hot per emotion (e.g. row {row}: "
                f"{value}). Each of the 4 emotions (neutral, happy, sad, angry) must be a (no, yes) pair of 0/1 "
                f"values summing to 1: turn class indices or probabilities into such pairs, or download the file "
                f"again (data/README.md).")
    with pytest.raises(DataFileError, match=f"^{re.escape(expected)}$"):
        load_mult_file(path)


def test_valid_iemocap_labels_with_or_without_an_emotion_load(tmp_path):
    raw = _small_raw("iemocap")
    raw["valid"]["labels"][0] = (1, 0)  # none of the four emotions: every pair is still (no, yes) one-hot
    data = load_mult_file(_write_pickle(tmp_path / "iemocap_data.pkl", raw))
    assert data.task == "classification"
    np.testing.assert_array_equal(data["valid"].labels, raw["valid"]["labels"])


def test_labels_exactly_at_the_ends_of_the_sentiment_range_are_accepted(tmp_path):
    raw = _small_raw()
    for split in SPLITS:
        raw[split]["labels"][0, 0, 0] = -3.0
        raw[split]["labels"][1, 0, 0] = 3.0
    data = load_mult_file(_write_pickle(tmp_path / "mosi_data.pkl", raw))
    assert data.layout.label_range == (-3.0, 3.0)
    for split in SPLITS:
        assert data[split].labels.min() == -3.0 and data[split].labels.max() == 3.0
        np.testing.assert_array_equal(data[split].labels, raw[split]["labels"])


def test_sentiment_range_is_checked_for_every_mosi_and_mosei_layout_and_only_those():
    ranges = {name: layout.label_range for name, layout in LAYOUTS.items()}
    assert ranges == {name: None if name.startswith("iemocap") else (-3.0, 3.0) for name in LAYOUTS}


def test_label_out_of_range_is_refused_for_an_explicit_layout_not_for_a_file_without_one(tmp_path):
    path = _write_pickle(tmp_path / "my_copy.pkl", _labels_out_of_range(_small_raw()))
    with pytest.raises(DataFileError, match=r"my_copy\.pkl: split 'train', key 'labels': 2 of 26 row\(s\) are "
                                            r"outside \[-3, 3\], the range of mosi_aligned sentiment labels"):
        load_mult_file(path, layout="mosi_aligned")
    data = load_mult_file(path)  # a custom file: its labels may be on any scale
    assert data["train"].labels[5, 0, 0] == 9.0


def test_refusing_loses_nothing_and_reports_nothing_else(tmp_path, recwarn):
    raw = _with_nonfinite(_small_raw())  # features the reader would clean in train and test ...
    raw["test"]["labels"][4, 0, 0] = 9.0  # ... but the test labels are refused first
    path = _write_pickle(tmp_path / "mosi_data.pkl", raw)
    before = path.read_bytes()
    with pytest.raises(DataFileError, match=r"split 'test', key 'labels': 1 of 14 row\(s\) are outside"):
        load_mult_file(path)
    with pytest.raises(DataFileError, match=r"\(e\.g\. row 4: 9\.0\)"):
        validate_raw(raw, get_layout("mosi", "aligned"), "in-memory")
    assert path.read_bytes() == before  # the file is untouched
    assert np.isneginf(raw["train"]["audio"][0, -1, 0])  # the caller's arrays too
    assert list(tmp_path.iterdir()) == [path]  # nothing written beside it
    assert not [w for w in recwarn if issubclass(w.category, NonFiniteValuesWarning)]  # no half-done report


def test_wrong_width_is_caught_against_an_explicit_layout_for_a_renamed_file(tmp_path):
    path = _write_pickle(tmp_path / "my_copy.pkl", _audio_width_6(_small_raw()))
    with pytest.raises(DataFileError, match=r"my_copy\.pkl: split 'test', key 'audio': expected shape \(N, 50, 5\) "
                                            r"for mosi_aligned, found \(14, 50, 6\)"):
        load_mult_file(path, layout="mosi_aligned")
    with pytest.raises(DataFileError, match=r"expected shape \(N, 50, 5\) for mosi_aligned"):
        load_mult_file(path, layout=get_layout("mosi", "aligned"))


def _audio_length_40(raw):
    raw["valid"]["audio"] = raw["valid"]["audio"][:, -40:]
    return raw


def _audio_without_frames(raw):
    raw["train"]["audio"] = raw["train"]["audio"][:, :0]
    return raw


def _vision_without_features(raw):
    raw["train"]["vision"] = raw["train"]["vision"][:, :, :0]
    return raw


@pytest.mark.parametrize(("damage", "pattern"), [
    (_audio_width_6, r"split 'test', key 'audio': \(T, D\) = \(50, 6\) differs from \(50, 5\) in split 'train'; "
                     r"every split must have the same sequence length and feature width"),
    (_audio_length_40, r"split 'valid', key 'audio': \(T, D\) = \(40, 5\) differs from \(50, 5\) in split 'train'"),
    (_audio_without_frames, r"split 'train', key 'audio': shape \(26, 0, 5\) has no frames or no features; every "
                            r"utterance needs at least one frame of at least one feature"),
    (_vision_without_features, r"split 'train', key 'vision': shape \(26, 50, 0\) has no frames or no features"),
], ids=["width", "length", "no-frames", "no-features"])
def test_file_of_unknown_name_is_checked_for_consistent_shapes_across_splits(tmp_path, damage, pattern):
    path = _write_pickle(tmp_path / "custom.pkl", damage(_small_raw()))
    with pytest.raises(DataFileError, match=rf"custom\.pkl: {pattern}"):
        load_mult_file(path)


def test_file_of_unknown_name_gets_a_layout_from_its_contents(tmp_path):
    path = _write_pickle(tmp_path / "custom.pkl", _small_raw("mosi", "unaligned"))
    data = load_mult_file(path)
    assert data.layout.name == "custom"
    assert data.layout.feature_dims == {"l": 300, "a": 5, "v": 20}
    assert data.layout.seq_lens == {"l": 50, "a": 375, "v": 500}
    assert data.layout.split_sizes == SIZES
    assert data.layout.label_shape == (1, 1)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0], ids=["half", "tenth", "empty"])
def test_truncated_file_is_reported_as_truncated_or_corrupt(tmp_path, keep):
    whole = pickle.dumps(_small_raw(), protocol=4)
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(whole[: int(len(whole) * keep)])
    size = path.stat().st_size
    with pytest.raises(DataFileError, match=r"could not be read as a pickle") as info:
        load_mult_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"({size:,} bytes)" in message
    assert "The file is truncated or corrupt; download it again" in message
    assert "data/README.md" in message


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


class _RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsPython], ids=["os.system", "builtins.exec"])
def test_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path, payload):
    marker = tmp_path / "pwned.txt"
    raw = _small_raw()
    raw["train"]["id"] = payload(marker)  # hidden deep inside an otherwise valid file
    path = _write_pickle(tmp_path / "mosi_data.pkl", raw)
    func = os.system if payload is _RunsShell else exec
    refused = f"{func.__module__}.{func.__name__}"  # 'posix.system' on Linux, 'builtins.exec'
    with pytest.raises(UnsafePickleError, match=rf"refused to load '{re.escape(refused)}'") as info:
        load_mult_file(path)
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message
    assert "Nothing from it was executed" in message
    assert "data/README.md" in message
    assert isinstance(info.value, DataFileError) and isinstance(info.value, pickle.UnpicklingError)


@pytest.mark.parametrize(("obj", "name"), [
    (collections.Counter(a=1), "collections.Counter"),
    (datetime.date(2020, 1, 1), "datetime.date"),
    (collections.OrderedDict(train=1), "collections.OrderedDict"),
], ids=["Counter", "date", "OrderedDict"])
def test_pickle_of_a_harmless_but_unlisted_class_is_refused(tmp_path, obj, name):
    path = _write_pickle(tmp_path / "odd.pkl", {"train": {"extra": obj}})
    with pytest.raises(UnsafePickleError, match=rf"odd\.pkl: refused to load '{re.escape(name)}'"):
        read_pickle_safely(path)


def test_persistent_references_are_refused(tmp_path):
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "external-array" if isinstance(obj, np.ndarray) else None

    path = tmp_path / "persistent.pkl"
    with path.open("wb") as f:
        WithPersistentIds(f, protocol=4).dump({"train": {"text": np.zeros(3)}})
    with pytest.raises(UnsafePickleError, match=r"persistent\.pkl: persistent references are not allowed"):
        read_pickle_safely(path)


def test_safe_reader_reads_plain_arrays_and_containers(tmp_path):
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, 2.5, "x", (True, None)],
           "c": np.array(["id_1", "id_2"]), "d": np.float64(1.5), "e": np.array([b"x", b"y"])}
    path = _write_pickle(tmp_path / "plain.pkl", obj)
    back = read_pickle_safely(path)
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["a"].dtype == np.float32
    assert back["b"] == obj["b"] and back["d"] == 1.5
    np.testing.assert_array_equal(back["c"], obj["c"])
    np.testing.assert_array_equal(back["e"], obj["e"])


# ---------------------------------------------------------------------------------------------------------
# Non-finite feature values


def _with_nonfinite(raw):
    # Last frames are always real (padding is at the front), so these values sit inside real frames.
    raw["train"]["audio"][0, -1, 0] = -np.inf
    raw["train"]["audio"][1, -1, :2] = np.nan
    raw["test"]["vision"][2, -1, 3] = np.inf
    return raw


def test_nonfinite_features_are_replaced_by_zero_counted_and_warned():
    raw = _with_nonfinite(_small_raw())
    originals = {(s, k): raw[s][k].copy() for s in SPLITS for k in FILE_KEYS.values()}
    with pytest.warns(NonFiniteValuesWarning, match=r"in-memory: replaced 4 NaN/inf feature values by 0"):
        splits, nonfinite = validate_raw(raw, get_layout("mosi", "aligned"), "in-memory")
    assert nonfinite == {"train/audio": 3, "test/vision": 1}
    a, v = splits["train"].a, splits["test"].v
    assert np.isfinite(a).all() and np.isfinite(v).all()
    assert a[0, -1, 0] == 0 and (a[1, -1, :2] == 0).all() and v[2, -1, 3] == 0
    # Everything else is untouched.
    expected_a = np.nan_to_num(originals[("train", "audio")], nan=0.0, posinf=0.0, neginf=0.0)
    np.testing.assert_array_equal(a, expected_a)
    np.testing.assert_array_equal(splits["train"].l, originals[("train", "text")])
    # The caller's arrays are not modified.
    for (s, k), before in originals.items():
        np.testing.assert_array_equal(raw[s][k], before)  # assert_array_equal treats NaN == NaN
    assert np.isneginf(raw["train"]["audio"][0, -1, 0]) and np.isnan(raw["train"]["audio"][1, -1, 0])
    assert not np.shares_memory(splits["train"].a, raw["train"]["audio"])


def test_nonfinite_replacement_is_recorded_in_the_loaded_data(tmp_path):
    path = _write_pickle(tmp_path / "mosi_data.pkl", _with_nonfinite(_small_raw()))
    with pytest.warns(NonFiniteValuesWarning, match=re.escape(str(path))):
        data = load_mult_file(path)
    assert data.nonfinite == {"train/audio": 3, "test/vision": 1}
    text = data.describe()
    assert "non-finite values replaced by 0: 4" in text
    assert "train/audio" in text
    table = data.summary().set_index(["split", "modality"])
    assert table.loc[("train", "audio"), "nonfinite_replaced"] == 3
    assert table.loc[("test", "vision"), "nonfinite_replaced"] == 1
    assert table.loc[("train", "language"), "nonfinite_replaced"] == 0


def test_clean_file_emits_no_warning(tmp_path, recwarn):
    path = _write_pickle(tmp_path / "mosi_data.pkl", _small_raw())
    data = load_mult_file(path)
    assert data.nonfinite == {}
    assert not [w for w in recwarn if issubclass(w.category, NonFiniteValuesWarning)]
    assert "non-finite" not in data.describe()


# ---------------------------------------------------------------------------------------------------------
# Where files are: missing files, the simulator fallback, a real file in the data folder


def test_missing_real_file_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataFileNotFound) as info:
        find_data_file("mosi", "aligned", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path.resolve()) in message
    assert "mosi_data.pkl" in message
    assert "147 MB" in message
    assert "data/README.md" in message
    assert "source='simulated'" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataFileError)


def test_missing_file_passed_by_path_names_what_it_is(tmp_path):
    with pytest.raises(DataFileNotFound, match=r"mosi_data_noalign\.pkl does not exist\. It is CMU-MOSI, unaligned, "
                                               r"about 326 MB\. Where to get data files: data/README\.md"):
        load_mult_file(tmp_path / "mosi_data_noalign.pkl")
    with pytest.raises(DataFileNotFound, match=r"nothing\.pkl: no such file"):
        read_pickle_safely(tmp_path / "nothing.pkl")


def test_get_data_real_reraises_not_found(tmp_path):
    with pytest.raises(DataFileNotFound, match=r"mosi_data_noalign\.pkl .*about 326 MB.*data/README\.md"):
        get_data("mosi", "unaligned", source="real", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was simulated or written


def test_get_data_rejects_an_unknown_source():
    with pytest.raises(ValueError, match=r"source must be 'auto', 'real' or 'simulated', got 'fake'"):
        get_data("mosi", source="fake")


def test_get_data_auto_falls_back_to_the_simulator(tmp_path, monkeypatch):
    # Without data_dir, $KTLIB_DATA_DIR moves both the real lookup and the simulator cache here.
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path))
    data = get_data("mosi", "aligned", source="auto", scale=0.02)
    assert data.synthetic is True and data.kind == "synthetic (simulator)"
    assert data.layout.name == "mosi_aligned"
    assert {s: len(d) for s, d in data.splits.items()} == SIZES
    assert data.source.startswith("simulator (mosi, aligned, seed 0, scale 0.02")
    assert str(tmp_path / "sim") in data.source
    assert sorted(p.suffix for p in (tmp_path / "sim").iterdir()) == [".json", ".npz", ".pkl"]


def test_get_data_with_a_data_dir_caches_its_fallback_simulation_there(tmp_path, monkeypatch):
    elsewhere = tmp_path / "default"
    monkeypatch.setenv("KTLIB_DATA_DIR", str(elsewhere))
    data = get_data("iemocap", "unaligned", source="auto", data_dir=tmp_path / "mine", scale=0.02)
    assert data.synthetic is True and data.layout.name == "iemocap_unaligned"
    assert len(list((tmp_path / "mine" / "sim").glob("iemocap_unaligned_*.pkl"))) == 1
    assert not elsewhere.exists(), "nothing is written outside the data_dir the caller gave"


def test_real_file_in_the_data_folder_is_found_and_loaded_as_real(tmp_path):
    raw = _small_raw()  # the simulator's MOSI preset has the published widths and lengths (50 x 300 / 5 / 20)
    path = _write_pickle(tmp_path / "mosi_data.pkl", raw)
    assert find_data_file("mosi", "aligned", data_dir=tmp_path) == path
    data = get_data("mosi", "aligned", data_dir=tmp_path)
    assert data.synthetic is False and data.kind == "real"
    assert data.source == str(path)
    assert data.layout.name == "mosi_aligned"
    assert data.truth is None and data.ceiling is None and data.sim_config is None
    for split in SPLITS:
        for m in MODALITIES:
            np.testing.assert_array_equal(data[split].features(m), raw[split][FILE_KEYS[m]])
        np.testing.assert_array_equal(data[split].labels, raw[split]["labels"])
        np.testing.assert_array_equal(data[split].ids, raw[split]["id"])
    with pytest.raises(KeyError, match=r"no split 'dev'; splits are \['train', 'valid', 'test'\]"):
        data["dev"]


def test_get_data_simulated_ignores_a_real_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path))
    _write_pickle(tmp_path / "mosi_data.pkl", _small_raw())
    data = get_data("mosi", "aligned", source="simulated", scale=0.02, seed=5)
    assert data.synthetic is True
    assert data.sim_config == preset("mosi", "aligned", scale=0.02, seed=5)


# ---------------------------------------------------------------------------------------------------------
# Simulation cache


def test_load_simulated_caches_and_reads_back_what_simulate_produced(sim_cache, monkeypatch):
    config = preset("mosi", "unaligned", scale=0.02, seed=7)
    paths = simulation_cache_paths(config, sim_cache)
    assert not any(p.exists() for p in paths.values())
    first = load_simulated(config, cache_dir=sim_cache)
    assert all(p.is_file() for p in paths.values())
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    def no_regeneration(config):
        raise AssertionError("load_simulated regenerated a cached simulation")

    monkeypatch.setattr(ktlib.data, "simulate", no_regeneration)
    second = load_simulated(config, cache_dir=sim_cache)
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mtimes

    sim = simulate(config)  # ktlib.simulate.simulate: only ktlib.data's reference was patched
    for data in (first, second):
        assert data.synthetic is True and data.kind == "synthetic (simulator)"
        assert "simulator" in data.source and str(paths["data"]) in data.source
        assert data.sim_config == config
        assert data.layout == config.layout
        for split in SPLITS:
            for m in MODALITIES:
                np.testing.assert_array_equal(data[split].features(m), sim.raw[split][FILE_KEYS[m]])
            np.testing.assert_array_equal(data[split].labels, sim.raw[split]["labels"])
            np.testing.assert_array_equal(data[split].ids, sim.raw[split]["id"])
            assert set(data.truth[split]) == set(sim.truth[split])
            for key, value in sim.truth[split].items():
                np.testing.assert_array_equal(data.truth[split][key], value, err_msg=f"truth {split}/{key}")
            assert data.ceiling[split] == pytest.approx(sim.ceiling[split], nan_ok=True)
    assert "noise ceiling on test" in second.describe()
    assert "[synthetic (simulator)]" in second.describe()


def test_load_simulated_accepts_knobs_and_refresh_regenerates(sim_cache, monkeypatch):
    calls = []

    def counting_simulate(config):
        calls.append(config)
        return simulate(config)

    monkeypatch.setattr(ktlib.data, "simulate", counting_simulate)
    data = load_simulated(cache_dir=sim_cache, dataset="iemocap", alignment="aligned", scale=0.02, seed=11)
    config = preset("iemocap", "aligned", scale=0.02, seed=11)
    assert data.sim_config == config
    assert data.task == "classification"
    assert calls == [config]
    load_simulated(config, cache_dir=sim_cache)
    assert calls == [config]  # cached
    again = load_simulated(config, cache_dir=sim_cache, refresh=True)
    assert calls == [config, config]  # regenerated on request
    np.testing.assert_array_equal(again["train"].labels, data["train"].labels)
    # An incomplete entry (ground truth lost) is regenerated too.
    simulation_cache_paths(config, sim_cache)["truth"].unlink()
    load_simulated(config, cache_dir=sim_cache)
    assert len(calls) == 3


def test_different_configs_use_different_cache_entries(sim_cache):
    a = simulation_cache_paths(preset("mosi", scale=0.02, seed=0), sim_cache)
    b = simulation_cache_paths(preset("mosi", scale=0.02, seed=1), sim_cache)
    c = simulation_cache_paths(preset("mosi", scale=0.02, audio_shared=0.3), sim_cache)
    d = simulation_cache_paths(preset("mosi", scale=0.02, private_affect=0.0), sim_cache)
    e = simulation_cache_paths(preset("mosi", scale=0.02, nuisance_shared=1.0), sim_cache)
    f = simulation_cache_paths(preset("mosi", scale=0.02, train_scale=0.25), sim_cache)
    assert len({x["data"] for x in (a, b, c, d, e, f)}) == 6  # every knob of the story is part of the key
    assert a["data"].name.startswith("mosi_aligned_") and a["data"].parent == sim_cache
    assert {p.name.removeprefix(a["data"].stem) for p in a.values()} == {".pkl", ".truth.npz", ".json"}


def test_cache_key_includes_the_simulator_version(sim_cache, monkeypatch):
    config = preset("mosi", scale=0.02)
    before = simulation_cache_paths(config, sim_cache)["data"]
    monkeypatch.setattr(ktlib.data, "SIMULATOR_VERSION", ktlib.data.SIMULATOR_VERSION + 1)
    assert simulation_cache_paths(config, sim_cache)["data"] != before  # a changed story never reads stale files


# ---------------------------------------------------------------------------------------------------------
# PyTorch: datasets, loaders, masks, presence


@pytest.fixture(scope="module")
def mosi_unaligned(sim_cache) -> MultimodalData:
    return load_simulated(preset("mosi", "unaligned", scale=0.02), cache_dir=sim_cache)


@pytest.fixture(scope="module")
def iemocap_aligned(sim_cache) -> MultimodalData:
    return load_simulated(preset("iemocap", "aligned", scale=0.02), cache_dir=sim_cache)


def test_unaligned_batch_has_the_documented_keys_shapes_and_dtypes(mosi_unaligned):
    batch = next(iter(make_loader(mosi_unaligned, "train", batch_size=8)))
    assert set(batch) == {"l", "a", "v", "mask_l", "mask_a", "mask_v", "present", "y", "index"}
    assert batch["l"].shape == (8, 50, 300)
    assert batch["a"].shape == (8, 375, 5)
    assert batch["v"].shape == (8, 500, 20)
    for m, t in (("l", 50), ("a", 375), ("v", 500)):
        assert batch[m].dtype == torch.float32
        assert batch[f"mask_{m}"].shape == (8, t) and batch[f"mask_{m}"].dtype == torch.bool
    assert batch["present"].shape == (8, 3) and batch["present"].dtype == torch.bool and batch["present"].all()
    assert batch["y"].shape == (8, 1) and batch["y"].dtype == torch.float32
    assert batch["index"].dtype == torch.int64
    split = mosi_unaligned["train"]
    idx = batch["index"].numpy()
    np.testing.assert_array_equal(batch["a"].numpy(), split.a[idx])
    np.testing.assert_array_equal(batch["y"].numpy(), split.labels[idx].reshape(-1, 1))


def test_masks_are_true_exactly_on_padding_which_sits_at_the_front(mosi_unaligned):
    split = mosi_unaligned["test"]
    batches = list(make_loader(mosi_unaligned, "test", batch_size=5))
    assert [len(b["index"]) for b in batches] == [5, 5, 4]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(14))  # test split is not shuffled
    for batch in batches:
        for m in MODALITIES:
            x, mask = batch[m], batch[f"mask_{m}"]
            assert torch.equal(mask, (x == 0).all(-1))
            real = ~mask
            # Front padding: once a frame is real, every later frame is real (cumulative max is unchanged).
            assert torch.equal(real, torch.cummax(real.int(), dim=1).values.bool())
            assert real[:, -1].all()  # every utterance has at least one real frame
            lengths = torch.as_tensor(split.lengths(m)[batch["index"].numpy()])
            assert torch.equal(real.sum(1), lengths)
            truth_len = mosi_unaligned.truth["test"][f"len_{m}"][batch["index"].numpy()]
            assert real.sum(1).tolist() == truth_len.tolist()


def test_single_item_has_unbatched_shapes(mosi_unaligned):
    item = MultimodalDataset(mosi_unaligned["valid"])[3]
    assert item["l"].shape == (50, 300) and item["a"].shape == (375, 5) and item["v"].shape == (500, 20)
    assert item["mask_a"].shape == (375,) and item["present"].shape == (3,) and item["y"].shape == (1,)
    assert int(item["index"]) == 3


def test_iemocap_targets_are_class_indices_per_emotion(iemocap_aligned):
    split = iemocap_aligned["train"]
    dataset = MultimodalDataset(split)
    assert dataset.task == "classification"
    batch = next(iter(make_loader(iemocap_aligned, "train", batch_size=16)))
    assert batch["y"].shape == (16, 4) and batch["y"].dtype == torch.int64
    expected = split.labels.argmax(-1)[batch["index"].numpy()]  # (B, 4): 1 where the emotion is present
    np.testing.assert_array_equal(batch["y"].numpy(), expected)
    assert (batch["y"].sum(1) == 1).all()  # one emotion per utterance
    assert batch["l"].shape == (16, 20, 300) and batch["a"].shape == (16, 20, 74) and batch["v"].shape == (16, 20, 35)


def test_shuffling_is_reproducible_from_the_seed(mosi_unaligned):
    def order(seed, shuffle=None):
        loader = make_loader(mosi_unaligned, "train", batch_size=4, seed=seed, shuffle=shuffle)
        return torch.cat([b["index"] for b in loader]).tolist()

    first = order(0)
    assert sorted(first) == list(range(26))
    assert first == order(0)
    assert first != order(1)
    assert first != list(range(26))  # the training split is shuffled by default
    assert order(0, shuffle=False) == list(range(26))
    loader = make_loader(mosi_unaligned, "train", batch_size=4, seed=0, drop_last=True)
    assert [len(b["index"]) for b in loader] == [4] * 6


class _Untouchable:
    """Stands in for a modality's array: has a shape, but any attempt to read values fails the test."""

    def __init__(self, shape):
        self.shape = shape
        self.ndim = len(shape)
        self.dtype = np.dtype(np.float32)

    def _read(self, *args, **kwargs):
        raise AssertionError("the audio array was read although audio is marked missing")

    __getitem__ = __array__ = __iter__ = __len__ = __float__ = __eq__ = __ne__ = _read
    __hash__ = None


def test_missing_audio_is_never_read(mosi_unaligned):
    real = mosi_unaligned["test"]
    n = len(real)
    split = SplitData(l=real.l, a=_Untouchable((n, 375, 5)), v=real.v, labels=real.labels, ids=real.ids)
    dataset = MultimodalDataset(split, missing=("a",))
    assert dataset.present[:, 1].sum() == 0
    loader = make_loader(split, "test", batch_size=4, missing=("a",))
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == n
    for batch in batches:
        assert batch["a"].shape == (len(batch["index"]), 375, 5)
        assert (batch["a"] == 0).all()
        assert batch["mask_a"].all()
        assert not batch["present"][:, 1].any()
        assert batch["present"][:, [0, 2]].all()
        np.testing.assert_array_equal(batch["l"].numpy(), real.l[batch["index"].numpy()])  # others unaffected
        assert torch.equal(batch["mask_v"], (batch["v"] == 0).all(-1))


def test_per_sample_presence_zeroes_only_the_absent_rows(mosi_unaligned):
    split = mosi_unaligned["test"]
    n = len(split)
    present = np.ones((n, 3), dtype=bool)
    present[::2, 1] = False  # audio absent for even utterances
    present[1, 2] = False  # vision absent for utterance 1
    batch = next(iter(make_loader(split, "test", batch_size=n, missing=present)))
    assert torch.equal(batch["present"], torch.from_numpy(present))
    for i in range(n):
        if present[i, 1]:
            np.testing.assert_array_equal(batch["a"][i].numpy(), split.a[i])
            assert torch.equal(batch["mask_a"][i], torch.from_numpy((split.a[i] == 0).all(-1)))
        else:
            assert (batch["a"][i] == 0).all() and batch["mask_a"][i].all()
            assert (split.a[i] != 0).any()  # the array itself holds real audio there
    assert (batch["v"][1] == 0).all() and batch["mask_v"][1].all()
    np.testing.assert_array_equal(batch["v"][0].numpy(), split.v[0])
    np.testing.assert_array_equal(batch["l"].numpy(), split.l)  # language present everywhere


def test_presence_matrix_from_names_and_matrices():
    expected = np.array([[True, False, True]] * 3)
    np.testing.assert_array_equal(presence_matrix(3, ("a",)), expected)
    np.testing.assert_array_equal(presence_matrix(3, ["a"]), expected)
    np.testing.assert_array_equal(presence_matrix(2), np.ones((2, 3), dtype=bool))
    np.testing.assert_array_equal(presence_matrix(2, ("l", "v")), [[False, True, False]] * 2)
    explicit = np.array([[True, False, True], [False, True, True]])
    np.testing.assert_array_equal(presence_matrix(2, explicit), explicit)


@pytest.mark.parametrize(("missing", "pattern"), [
    (("audio",), r"unknown modality \['audio'\]; use 'l', 'a', 'v' \(language, audio, vision\)"),
    (("a", "x", "text"), r"unknown modality \['x', 'text'\]; use 'l', 'a', 'v'"),
    (np.ones((4, 3), dtype=bool), r"a presence matrix must be bool of shape \(5, 3\) in \(l, a, v\) order, "
                                  r"found bool \(4, 3\)"),
    (np.ones((5, 2), dtype=bool), r"must be bool of shape \(5, 3\).*found bool \(5, 2\)"),
    (np.ones((5, 3), dtype=np.int64), r"must be bool of shape \(5, 3\).*found int64 \(5, 3\)"),
], ids=["full-name", "several-unknown", "too-few-rows", "too-few-columns", "not-bool"])
def test_presence_matrix_rejects_unknown_names_and_bad_matrices(missing, pattern):
    with pytest.raises(ValueError, match=pattern):
        presence_matrix(5, missing)


def test_dataset_rejects_a_bad_presence_matrix(mosi_unaligned):
    with pytest.raises(ValueError, match=r"must be bool of shape \(14, 3\)"):
        MultimodalDataset(mosi_unaligned["test"], missing=np.ones((13, 3), dtype=bool))
