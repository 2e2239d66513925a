"""Reconstructed vs real audio: hand-worked similarity measures, and reconstructions that never read the audio."""

import numpy as np
import pytest
import torch

from ktlib import analysis as A
from ktlib.config import model_config
from ktlib.data import load_simulated
from ktlib.model import KTModel
from ktlib.simulate import preset

torch.set_num_threads(1)


def test_cosine_by_hand():
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    y = np.array([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]])
    np.testing.assert_allclose(A.cosine(x, y), [0.0, 1.0, 0.0])  # orthogonal, parallel, a zero row


def test_frame_mse_uses_real_frames_only():
    x = np.zeros((1, 3, 2))
    y = np.array([[[1.0, 1.0], [3.0, 1.0], [100.0, 100.0]]])
    real = np.array([[True, True, False]])
    # (1 + 1 + 9 + 1) / (2 frames * 2 features) = 3
    assert A.frame_mse(x, y, real)[0] == pytest.approx(3.0)


def test_per_dim_corr_by_hand():
    x = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    y = np.array([[2.0, 3.0], [4.0, 2.0], [6.0, 1.0]])
    np.testing.assert_allclose(A.per_dim_corr(x, y), [1.0, -1.0])
    assert np.isnan(A.per_dim_corr(x, np.ones_like(x))).all()  # a constant feature has no correlation


def test_linear_cka_invariances_and_a_hand_worked_value():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert A.linear_cka(x, x) == pytest.approx(1.0)
    assert A.linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)  # rotation, scale and shift
    assert A.linear_cka(x, rng.normal(size=(200, 5))) < 0.1  # unrelated
    # one feature each: CKA is the squared correlation; x = (1, 2, 3), y = (1, 3, 2) -> r = 0.5, CKA = 0.25
    assert A.linear_cka(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [3.0], [2.0]])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same samples"):
        A.linear_cka(x, x[:10])


def test_shuffled_pairs_every_sample_with_another():
    for n in (2, 3, 50):
        perm = A.shuffled(n, seed=n)
        assert sorted(perm) == list(range(n)) and (perm != np.arange(n)).all()
    with pytest.raises(ValueError, match="at least two"):
        A.shuffled(1)


def test_pooled_averages_real_frames():
    frames = np.array([[[1.0], [3.0], [50.0]], [[2.0], [2.0], [2.0]]])
    emb = A.AudioEmbeddings({"f_a": frames}, np.array([[True, True, False], [False, False, False]]), np.zeros(2))
    np.testing.assert_allclose(emb.pooled("f_a"), [[2.0], [0.0]])


def test_embed_2d_is_joint_and_keeps_block_sizes():
    blocks = {"a": np.eye(4)[:3] * 5, "b": np.eye(4)[1:] * 5 + 1}
    pts = A.embed_2d(blocks, "pca")
    assert pts["a"].shape == (3, 2) and pts["b"].shape == (3, 2)
    with pytest.raises(ValueError, match="pca' or 'umap"):
        A.embed_2d(blocks, "tsne")


@pytest.fixture(scope="module", params=["aligned", "unaligned"])
def mosi(request, sim_cache):
    return load_simulated(preset("mosi", request.param, scale=0.03), cache_dir=sim_cache)


@pytest.fixture(scope="module")
def kt_model(mosi):
    torch.manual_seed(0)
    cfg = model_config(mosi.layout, setting="kt", d=8, heads=2, layers=1, mem_layers=1, kt_layers=1)
    return KTModel(cfg).eval()


def test_audio_embeddings_on_the_reconstructions_time_axis(mosi, kt_model):
    emb = A.audio_embeddings(kt_model, mosi, "test", batch_size=16)
    n, t = len(mosi["test"]), mosi.layout.seq_lens["l"]  # the shared word slots, or the language's (unaligned)
    for name in A.NAMES:
        assert emb.frames[name].shape == (n, t, 8)
    assert emb.real.shape == (n, t) and emb.y.shape == (n,)
    words = mosi["test"].lengths("l")[:, None] > np.arange(t)[::-1][None]
    assert not (emb.real & ~words).any(), "no frame outside the utterance's words counts as real"
    if mosi.layout.alignment == "aligned":
        np.testing.assert_array_equal(emb.real, words & (mosi["test"].lengths("a")[:, None] > np.arange(t)[::-1]))
    assert set(emb.truth) == set(A.TRUTH) and emb.truth["shared"].shape == (n, t, 2)
    table = A.similarity_table(emb)
    assert set(table["reconstruction"]) == {A.NAMES[n] for n in A.RECONSTRUCTIONS}
    assert np.isfinite(table.drop(columns="reconstruction").to_numpy(dtype=float)).all()


def test_truth_on_the_word_slots_is_the_mean_of_each_words_audio_frames(mosi, kt_model):
    emb = A.audio_embeddings(kt_model, mosi, "test", batch_size=16)
    truth = mosi.truth["test"]
    i = int(np.argmax(mosi["test"].lengths("l")))
    n_l, n_a = int(mosi["test"].lengths("l")[i]), int(mosi["test"].lengths("a")[i])
    t_l, t_a = mosi.layout.seq_lens["l"], mosi.layout.seq_lens["a"]
    frames = truth["audio_affect_shared"][i, t_a - n_a:]  # (n_a, 2) real audio frames, in order
    word = ((2 * np.arange(n_a) + 1) * n_l) // (2 * n_a)  # the word whose span holds each frame's centre
    for w in range(n_l):
        if (word == w).any():
            np.testing.assert_allclose(emb.truth["shared"][i, t_l - n_l + w], frames[word == w].mean(0), atol=1e-5)


def test_reconstruction_is_the_same_whatever_the_audio_holds(mosi, kt_model):
    from ktlib.data import make_loader

    batch = next(iter(make_loader(mosi, "test", 8, shuffle=False)))
    with torch.no_grad():
        _, a = kt_model(batch, return_details=True)
        _, b = kt_model(dict(batch, a=torch.full_like(batch["a"], float("nan"))), return_details=True)
    for name in A.RECONSTRUCTIONS:
        assert torch.equal(a[name], b[name])
    target = kt_model.audio_target(batch)[0]
    assert not torch.equal(target, kt_model.audio_target(dict(batch, a=batch["a"] + 1.0))[0])


def test_ridge_r2_recovers_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    x = {s: rng.standard_normal((400, 5)) for s in ("train", "valid", "test")}
    w = np.array([[1.0], [-2.0], [0.0], [0.5], [0.0]])
    signal = {s: x[s] @ w + 0.1 * rng.standard_normal((400, 1)) for s in x}
    noise = {s: rng.standard_normal((400, 1)) for s in x}
    assert A.ridge_r2(x, signal)[0] > 0.99
    assert A.ridge_r2(x, noise)[0] < 0.02  # held out: nothing to find


def test_reconstruction_r2_rows_and_the_probe_of_the_target_itself(mosi, kt_model):
    embs = {s: A.audio_embeddings(kt_model, mosi, s) for s in ("train", "valid", "test")}
    table = A.reconstruction_r2(embs, mosi)
    assert set(table["truth"]) == set(A.TRUTH)  # audio_shared = 0.8: every part is present
    names = set(table["representation"])
    assert {"raw language + vision (ceiling)", "f'_A vs another utterance (shuffled)", A.NAMES["f_a"]} <= names
    assert np.isfinite(table["R2"]).all() and (table["R2"] <= 1).all()
    real = A.audio_embeddings(KTModel(model_config(mosi.layout, setting="kt", d=8, heads=2, layers=1,
                                                              kt_layers=1)), mosi)
    real.truth = None
    with pytest.raises(ValueError, match="ground truth is only known for simulated data"):
        A.reconstruction_r2({"train": real, "valid": real, "test": real}, mosi)


def test_only_a_kt_model_has_reconstructions(mosi):
    model = KTModel(model_config(mosi.layout, setting="full", d=8, heads=2, layers=1, mem_layers=1))
    with pytest.raises(ValueError, match="'kt' model"):
        A.audio_embeddings(model, mosi)
    with pytest.raises(ValueError, match="knowledge-transfer network"):
        model.audio_target({})
