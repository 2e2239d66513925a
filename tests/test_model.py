"""Tests of ktlib.model: shapes of every preset and setting, gradients, overfitting one batch, audio never read at
inference, cross-modal attention against torch.nn.MultiheadAttention, the stretched causal mask, the config
(JSON, validation), checkpoints, the target-modality and loss ablations, the consistency loss and parameter counts.

Most tests use a tiny model (d=8, one layer everywhere) on batches synthesised here with torch: random features,
zero-padded at the front, with masks computed as ktlib.data computes them (True on all-zero frames).  The short
layouts below keep those tests fast; the overfitting test reads batches of the simulator through ktlib.data into a
private cache folder.  Everything is seeded, so every number is deterministic.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ktlib.checkpoint import load_checkpoint, save_checkpoint
from ktlib.config import model_config
from ktlib.data import load_simulated, make_loader
from ktlib.layers import causal_mask, causal_mask_from_padding, pool_onto, span_mask_from_padding
from ktlib.model import (
    SETTING_TABLE,
    SETTINGS,
    CrossModalAttention,
    KTModel,
    ModelConfig,
    consistency_loss,
    count_parameters,
)
from ktlib.model_extras import derangement, load_audio_encoder
from ktlib.simulate import preset
from ktlib.specs import MODALITIES, get_layout

PRESETS = [(d, a) for d in ("mosi", "mosei", "iemocap") for a in ("aligned", "unaligned")]
PRESET_IDS = [f"{d}-{a}" for d, a in PRESETS]
TINY = dict(d=8, heads=2, layers=1, mem_layers=1, kt_layers=1, kt_encoder_layers=1)
NO_DROPOUT = dict(text_dropout=0.0, embed_dropout=0.0, relu_dropout=0.0, res_dropout=0.0, out_dropout=0.0,
                  attn_dropout={"l": 0.0, "a": 0.0, "v": 0.0})
# Short layouts with the real structure (aligned: one shared length; unaligned: audio and vision longer than text)
SHORT = {
    "aligned": dict(feature_dims={"l": 12, "a": 5, "v": 7}, seq_lens={"l": 9, "a": 9, "v": 9}),
    "unaligned": dict(feature_dims={"l": 12, "a": 5, "v": 7}, seq_lens={"l": 6, "a": 11, "v": 14}),
}
# Sources fused per kept target, summed over the targets (all targets kept): the pooled width in units of d.
# Three inputs: each target attends to the two others (3 x 2); two inputs: one each (2 x 1); a lone modality: itself.
POOLED_SOURCES = {"full": 6, "kt": 6, "language_vision": 2, "vision_only": 1, "language_only": 1}
AUDIO_FREE = [s for s in SETTINGS if "a" not in SETTING_TABLE[s].reads_at_test]  # never read audio at inference


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's tiny tensors on one intra-op thread (restored afterwards).

    They gain nothing from a thread pool, and on a 2-core machine shared with another busy process the pool's
    spinning threads made this file 20-40x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def short_config(alignment: str = "aligned", **overrides) -> ModelConfig:
    """A tiny, dropout-free model on a short layout."""
    return ModelConfig(**{**SHORT[alignment], **TINY, **NO_DROPOUT, **overrides})


def synth_batch(cfg: ModelConfig, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch in ktlib.data's format: front zero-padded random features, masks True on all-zero frames.

    Every sample keeps the same share of real frames in every modality (so aligned data share one padding pattern)
    and at least one real frame (the last one, which the backbone pools).
    """
    g = torch.Generator().manual_seed(seed)
    share = torch.rand(batch_size, generator=g)
    batch = {}
    for m in MODALITIES:
        t, dim = cfg.seq_lens[m], cfg.feature_dims[m]
        n_real = (share * t).ceil().long().clamp(1, t)  # (B,)
        x = torch.randn(batch_size, t, dim, generator=g)
        x[torch.arange(t)[None, :] < (t - n_real)[:, None]] = 0.0  # zero padding at the front
        batch[m] = x
        batch[f"mask_{m}"] = (x == 0).all(-1)  # (B, T_m) True on padding
    batch["present"] = torch.ones(batch_size, len(MODALITIES), dtype=torch.bool)
    if cfg.task == "classification":
        batch["y"] = torch.randint(0, 2, (batch_size, 4), generator=g)
    else:
        batch["y"] = 6 * torch.rand(batch_size, 1, generator=g) - 3  # ratings in [-3, 3]
    return batch


def task_loss(cfg: ModelConfig, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MulT's task losses: L1 for regression, cross entropy over the 4 binary emotion tasks for IEMOCAP."""
    if cfg.task == "classification":
        return F.cross_entropy(out.reshape(-1, 2), y.reshape(-1))
    return F.l1_loss(out, y)


def build(cfg: ModelConfig, seed: int = 0) -> KTModel:
    torch.manual_seed(seed)
    return KTModel(cfg)


# ---------------------------------------------------------------------------------------------------------
# 1. Shapes of every preset and setting


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize(("dataset", "alignment"), PRESETS, ids=PRESET_IDS)
def test_shapes_of_every_preset_and_setting(dataset, alignment, setting):
    layout = get_layout(dataset, alignment)
    cfg = model_config(dataset, alignment, setting=setting, **TINY)
    assert cfg.task == layout.task and cfg.seq_lens == layout.seq_lens and cfg.feature_dims == layout.feature_dims
    model = build(cfg)
    batch = synth_batch(cfg, batch_size=2)
    b, d, lens = 2, cfg.d, layout.seq_lens
    out_shape = (b, 4, 2) if dataset == "iemocap" else (b, 1)

    model.train()
    with torch.no_grad():
        out, details = model(batch, return_details=True)
    assert out.shape == out_shape and torch.isfinite(out).all()
    assert details["pooled"].shape == (b, POOLED_SOURCES[setting] * d)
    if setting != "kt":
        assert set(details) == {"pooled"}
    else:
        # aligned: f'_A lives on the shared time axis; unaligned: on the word slots (the language's axis)
        t_hat = lens["l"]
        assert details["f_l"].shape == (b, lens["l"], d)
        assert details["f_v"].shape == (b, lens["v"], d)
        for name in ("a_from_v", "a_from_l", "f_a_hat"):
            assert details[name].shape == (b, t_hat, d), name
        assert details["f_a"].shape == (b, t_hat, d)  # training: the real audio's representation on that axis
        if alignment == "aligned":  # padding only where both sources are padding
            assert torch.equal(details["mask_a_hat"], batch["mask_l"] & batch["mask_v"])
        else:  # the language's padding: no slot outside the utterance is a real frame
            assert torch.equal(details["mask_a_hat"], batch["mask_l"])
        for name in ("loss_va", "loss_la"):
            assert details[name].shape == () and torch.isfinite(details[name]) and details[name] > 0

    model.eval()
    with torch.no_grad():
        out_eval, details_eval = model(batch, return_details=True)
    assert out_eval.shape == out_shape
    assert not {"f_a", "loss_va", "loss_la"} & set(details_eval)  # no audio at inference
    assert model.consistency_term(details_eval).item() == 0.0
    if setting == "kt":
        assert details_eval["f_a_hat"].shape == details["f_a_hat"].shape


def test_classification_logits_are_four_binary_tasks():
    cfg = model_config("iemocap", "aligned", **TINY, **NO_DROPOUT, seq_lens={"l": 6, "a": 6, "v": 6})
    model = build(cfg).eval()
    batch = synth_batch(cfg, batch_size=3)
    with torch.no_grad():
        out, details = model(batch, return_details=True)
    assert cfg.output_dim == 8 and out.shape == (3, 4, 2)
    # (B, 4, 2) is the (B, 8) output layer read as 4 emotions x (no, yes)
    flat = model.backbone.out_layer(details["pooled"] + model.backbone.proj2(F.relu(model.backbone.proj1(
        details["pooled"]))))
    assert torch.allclose(out, flat.view(3, 4, 2), atol=1e-6)


def test_fully_padded_sample_gives_a_finite_prediction():
    cfg = short_config("unaligned", setting="kt")
    batch = synth_batch(cfg, batch_size=3)
    for m in MODALITIES:  # sample 0 has no real frame at all
        batch[m][0] = 0.0
        batch[f"mask_{m}"][0] = True
    model = build(cfg)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            out, details = model(batch, return_details=True)
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(v).all() for v in details.values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------------------------------------
# 2. Gradients reach every parameter a setting uses


AUDIO_ENCODER = ("proj.a.", "kt.enc_a.")  # the consistency target's projection and encoder


def _backward_once(cfg: ModelConfig) -> KTModel:
    model = build(cfg).train()
    batch = synth_batch(cfg, batch_size=3)  # an odd batch: the L1 loss's signs cannot cancel in the output bias
    out, details = model(batch, return_details=True)
    (task_loss(cfg, out, batch["y"]) + model.consistency_term(details)).backward()
    return model


GRADIENT_CASES = [(s, a, {}) for s in SETTINGS for a in ("aligned", "unaligned")] + [
    ("kt", "aligned", {"kt_concat": "time"}),
    ("kt", "unaligned", {"kt_concat": "time"}),
    ("kt", "aligned", {"kt_time_axis": "queries"}),
    ("kt", "aligned", {"kt_encoder_layers": 0}),
]


@pytest.mark.parametrize(("setting", "alignment", "extra"), GRADIENT_CASES,
                         ids=[f"{s}-{a}-{'-'.join(map(str, e.values())) or 'default'}" for s, a, e in GRADIENT_CASES])
def test_every_used_parameter_gets_a_finite_nonzero_gradient(setting, alignment, extra):
    """One backward of task loss + consistency term (train mode, no dropout).

    The only parameters without gradient are, in ``kt`` with the default ``kt_target="random"``, the audio
    projection and audio encoder: they only produce the consistency target f_A, which is detached by design.
    """
    cfg = short_config(alignment, setting=setting, **extra)
    model = _backward_once(cfg)
    frozen = setting == "kt" and cfg.kt_target == "random"
    checked = 0
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        if frozen and name.startswith(AUDIO_ENCODER):
            assert p.grad is None or not p.grad.any(), f"{name} gets gradient through a frozen target"
            continue
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
        checked += 1
    assert checked > 0
    if extra.get("kt_concat") == "time":
        assert model.kt.recon["a"].segment.grad.abs().sum() > 0
    if frozen:  # the audio parts exist (proj.a always; enc_a unless kt_encoder_layers == 0) and were skipped
        assert any(n.startswith("proj.a.") for n, _ in model.named_parameters())


@pytest.mark.parametrize("alignment", ["aligned", "unaligned"])
def test_trained_target_sends_consistency_gradient_to_the_audio_encoder(alignment):
    frozen = _backward_once(short_config(alignment, setting="kt", kt_target="random"))
    trained = _backward_once(short_config(alignment, setting="kt", kt_target="trained"))
    audio_params = [n for n, _ in trained.named_parameters() if n.startswith(AUDIO_ENCODER)]
    assert "proj.a.conv.weight" in audio_params and any(n.startswith("kt.enc_a.") for n in audio_params)
    frozen_params, trained_params = dict(frozen.named_parameters()), dict(trained.named_parameters())
    for name in audio_params:
        g = frozen_params[name].grad
        assert g is None or not g.any(), name
        g = trained_params[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # the target itself: detached when frozen, part of the graph when trained
    cfg = short_config(alignment, setting="kt", kt_target="random")
    batch = synth_batch(cfg)
    assert not build(cfg).train()(batch, return_details=True)[1]["f_a"].requires_grad
    cfg = short_config(alignment, setting="kt", kt_target="trained")
    assert build(cfg).train()(batch, return_details=True)[1]["f_a"].requires_grad


# ---------------------------------------------------------------------------------------------------------
# 3. Overfitting one small batch


@pytest.fixture(scope="module")
def simulated_batches(sim_cache):
    """A batch of 8 training utterances from the simulator (MOSI and IEMOCAP, aligned), read through ktlib.data."""
    batches = {}
    for dataset in ("mosi", "iemocap"):
        data = load_simulated(preset(dataset, "aligned", scale=0.02), cache_dir=sim_cache)
        batches[dataset] = next(iter(make_loader(data, "train", batch_size=8, shuffle=False)))
    return batches


OVERFIT_CASES = [("mosi", s) for s in SETTINGS] + [("iemocap", "kt")]


@pytest.mark.parametrize(("dataset", "setting"), OVERFIT_CASES, ids=[f"{d}-{s}" for d, s in OVERFIT_CASES])
def test_overfits_one_batch(simulated_batches, dataset, setting):
    """100 Adam steps (lr 3e-3) on 8 utterances bring the training loss (task + consistency) below 30% of its start.

    Measured with these seeds (loss after / loss at the start): after 100 steps MOSI kt 9.5% (its consistency part
    12%), IEMOCAP kt 1.3%, the other settings 0.6-3.4%; after 60 steps every case is already below 15%.
    """
    batch = simulated_batches[dataset]
    cfg = model_config(dataset, "aligned", setting=setting, **TINY, **NO_DROPOUT)
    model = build(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(100):
        out, details = model(batch, return_details=True)
        task, consistency = task_loss(cfg, out, batch["y"]), model.consistency_term(details)
        loss = task + consistency
        history.append((loss.item(), task.item(), consistency.item()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    (first, first_task, first_c), (last, last_task, last_c) = history[0], history[-1]
    assert all(math.isfinite(x) for row in history for x in row)
    assert last < 0.3 * first, history[::10]
    assert last_task < 0.3 * first_task, history[::10]
    if setting == "kt":  # the reconstruction learns too, not only the task head
        assert first_c > 0 and last_c < 0.3 * first_c, history[::10]
    else:
        assert first_c == last_c == 0.0


# ---------------------------------------------------------------------------------------------------------
# 4. Audio is never read at inference


class AudioTrap(dict):
    """A batch whose audio entries raise on any access (key lookup, get, iteration over items or values)."""

    def __getitem__(self, key):
        if key in ("a", "mask_a"):
            raise LookupError(f"the model read batch[{key!r}]")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in ("a", "mask_a"):
            raise LookupError(f"the model read batch.get({key!r})")
        return super().get(key, default)

    def items(self):
        raise LookupError("the model iterated over the batch's items")

    def values(self):
        raise LookupError("the model iterated over the batch's values")


class Untouchable(torch.Tensor):
    """A tensor that raises on any torch operation, attribute included (shape, dtype, indexing, arithmetic)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise LookupError(f"the model used the audio tensor ({func})")


def _audio_variants(batch):
    """The same batch with audio and audio mask replaced in every way that would change a model that reads them."""
    a, mask_a = batch["a"], batch["mask_a"]
    g = torch.Generator().manual_seed(1)
    yield "random", {"a": 10 * torch.randn(a.shape, generator=g)}
    yield "zeros", {"a": torch.zeros_like(a)}
    yield "nan", {"a": torch.full_like(a, float("nan"))}
    yield "+inf", {"a": torch.full_like(a, float("inf"))}
    yield "mask all padding", {"mask_a": torch.ones_like(mask_a)}
    yield "mask random", {"mask_a": torch.rand(mask_a.shape, generator=g) < 0.5}
    yield "mask none", {"mask_a": torch.zeros_like(mask_a)}
    yield "nan and mask flipped", {"a": torch.full_like(a, float("nan")), "mask_a": ~mask_a}


@pytest.mark.parametrize("alignment", ["aligned", "unaligned"])
@pytest.mark.parametrize("setting", AUDIO_FREE)
def test_prediction_ignores_audio_at_inference(setting, alignment):
    cfg = short_config(alignment, setting=setting)
    model = build(cfg).eval()
    batch = synth_batch(cfg, batch_size=3)
    with torch.no_grad():
        reference = model(batch)
        assert torch.isfinite(reference).all()
        for name, change in _audio_variants(batch):
            assert torch.equal(model(dict(batch, **change)), reference), name
        # structurally: the audio entries cannot be touched at all
        assert torch.equal(model(AudioTrap(batch)), reference)
        assert torch.equal(model(dict(batch, a=batch["a"].as_subclass(Untouchable),
                                      mask_a=batch["mask_a"].as_subclass(Untouchable))), reference)
        without_audio = {k: v for k, v in batch.items() if k not in ("a", "mask_a")}
        assert torch.equal(model(without_audio), reference)


def test_audio_traps_fire_where_audio_is_read():
    """Controls for the test above: the traps do catch a read (kt training, full at inference)."""
    kt = build(short_config("aligned", setting="kt")).train()
    full = build(short_config("aligned", setting="full")).eval()
    assert "a" in SETTING_TABLE["full"].reads_at_test and "a" not in SETTING_TABLE["kt"].reads_at_test
    batch = synth_batch(kt.cfg)
    for model in (kt, full):
        with pytest.raises(LookupError, match="audio|batch"):
            model(AudioTrap(batch))
        with pytest.raises(LookupError, match="audio tensor"):
            model(dict(batch, a=batch["a"].as_subclass(Untouchable)))


@pytest.mark.parametrize("alignment", ["aligned", "unaligned"])
def test_audio_drives_kt_training_losses_and_full_inference(alignment):
    batch = synth_batch(short_config(alignment), batch_size=3)
    other = dict(batch, a=torch.where(batch["mask_a"][..., None], 0.0, torch.randn(batch["a"].shape)))
    with torch.no_grad():
        kt = build(short_config(alignment, setting="kt")).train()
        _, details = kt(batch, return_details=True)
        _, details_other = kt(other, return_details=True)
        assert not torch.equal(details["f_a"], details_other["f_a"])
        assert not torch.allclose(details["loss_va"], details_other["loss_va"])
        assert not torch.allclose(details["loss_la"], details_other["loss_la"])
        # the reconstruction itself does not see the audio, even in training
        assert torch.equal(details["f_a_hat"], details_other["f_a_hat"])

        full = build(short_config(alignment, setting="full")).eval()
        assert not torch.allclose(full(batch), full(other))


# ---------------------------------------------------------------------------------------------------------
# 5. Cross-modal attention equals torch.nn.MultiheadAttention on the same weights


def _attention_pair(d: int = 8, heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    ours = CrossModalAttention(d, heads)
    with torch.no_grad():  # non-zero biases, so that they are compared too
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    ref = nn.MultiheadAttention(d, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj_weight)
        ref.in_proj_bias.copy_(ours.in_proj_bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours.eval(), ref.eval()


def _key_padding(b: int, s: int, at: str) -> torch.Tensor:
    """(B, S) True on padding: sample 0 loses 2 keys, sample 1 all but one, sample 2 none.

    ``front`` pads the first keys (the data's convention); ``end`` pads the last ones, so that together with the
    causal mask (query 0 sees key 0 when T <= S) every query keeps at least one key.
    """
    mask = torch.zeros(b, s, dtype=torch.bool)
    if at == "front":
        mask[0, :2], mask[1, : s - 1] = True, True
    else:
        mask[0, s - 2:], mask[1, 1:] = True, True
    return mask


ATTENTION_CASES = [(k, t, s) for k in ("none", "key_padding") for t, s in ((5, 7), (7, 4), (6, 6))] + [
    (k, t, s) for k in ("causal", "both") for t, s in ((5, 7), (6, 6), (1, 4))]


@pytest.mark.parametrize(("masks", "t", "s"), ATTENTION_CASES, ids=[f"{k}-T{t}-S{s}" for k, t, s in ATTENTION_CASES])
def test_cross_modal_attention_equals_torch_multihead_attention(masks, t, s):
    ours, ref = _attention_pair()
    g = torch.Generator().manual_seed(3)
    b = 3
    query, source = torch.randn(b, t, 8, generator=g), torch.randn(b, s, 8, generator=g)
    kpm = {"none": None, "key_padding": _key_padding(b, s, "front"), "causal": None,
           "both": _key_padding(b, s, "end")}[masks]
    attn_mask = causal_mask(t, s) if masks in ("causal", "both") else None
    with torch.no_grad():
        expected, expected_w = ref(query, source, source, key_padding_mask=kpm, attn_mask=attn_mask,
                                   need_weights=True, average_attn_weights=False)
        assert torch.isfinite(expected).all()  # the masks leave every query at least one key
        fused, no_w = ours(query, source, key_padding_mask=kpm, attn_mask=attn_mask)
        explicit, w = ours(query, source, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True)
    assert no_w is None
    assert fused.shape == explicit.shape == (b, t, 8) and w.shape == (b, 2, t, s)
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.allclose(explicit, expected, atol=1e-5)
    assert torch.allclose(w, expected_w, atol=1e-6)
    assert torch.allclose(fused, explicit, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(b, 2, t))
    if kpm is not None:
        assert not w.masked_select(kpm[:, None, None, :].expand_as(w)).any()
    if attn_mask is not None:
        assert not w.masked_select(attn_mask.expand_as(w)).any()


def test_query_that_may_see_nothing_gets_a_zero_attention_result():
    # A query with no visible key (absent source, or every key in its future) must not be NaN and must add
    # nothing: the attention result is zero, so the layer's output is just out_proj's bias.
    ours, ref = _attention_pair()
    g = torch.Generator().manual_seed(4)
    query, source = torch.randn(2, 7, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[0] = True  # sample 0: every key is padding (an absent modality)
    bias = ours.out_proj.bias.detach()
    with torch.no_grad():
        unmasked, _ = ours(query, source)
        for need_weights in (False, True):
            out, w = ours(query, source, key_padding_mask=kpm, need_weights=need_weights)
            assert torch.isfinite(out).all()
            assert torch.allclose(out[0], bias.expand(7, 8), atol=1e-6)
            assert torch.allclose(out[1], unmasked[1], atol=1e-6)
            if need_weights:
                assert (w[0] == 0).all() and torch.allclose(w[1].sum(-1), torch.ones(2, 7))

        # T > S under the causal mask: the first queries have no key; the others match MultiheadAttention
        mask = causal_mask(7, 4)
        blocked_rows = mask.all(-1)
        assert blocked_rows.any() and not blocked_rows.all()
        expected, _ = ref(query, source, source, attn_mask=mask)
        for need_weights in (False, True):
            out, _ = ours(query, source, attn_mask=mask, need_weights=need_weights)
            assert torch.isfinite(out).all()
            assert torch.allclose(out[:, ~blocked_rows], expected[:, ~blocked_rows], atol=1e-5)
            assert torch.allclose(out[:, blocked_rows], bias.expand(2, int(blocked_rows.sum()), 8), atol=1e-6)


def test_per_sample_causal_mask_follows_each_samples_real_frames():
    # Sample 0: 2 real query steps of 4, 3 real keys of 6; sample 1: no padding (the positional mask).
    q_pad = torch.tensor([[True, True, False, False], [False, False, False, False]])
    k_pad = torch.tensor([[True, True, True, False, False, False], [False] * 6])
    mask = causal_mask_from_padding(q_pad, k_pad)
    assert mask.shape == (2, 4, 6)
    # sample 0, real query 0 (of 2) sees real keys j with (j+1)/3 <= 1/2 -> j = 0 (position 3); query 1 sees all.
    assert mask[0, 2].tolist() == [False, False, False, False, True, True]
    assert mask[0, 3].tolist() == [False] * 6
    assert not mask[0, :2].any()  # padding queries get no causal constraint
    assert torch.equal(mask[1], causal_mask(4, 6))


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    att = CrossModalAttention(8, 2, dropout=0.5)
    query, source = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    with torch.no_grad():
        att.eval()
        assert torch.equal(att(query, source)[0], att(query, source)[0])
        evaluated = att(query, source)[0]
        att.train()
        assert not torch.allclose(att(query, source)[0], evaluated)


def test_model_returns_attention_weights_of_every_block():
    cfg = short_config("unaligned", setting="full")
    model = build(cfg).eval()
    batch = synth_batch(cfg)
    with torch.no_grad():
        out, details = model(batch, return_details=True, need_weights=True)
        assert torch.allclose(out, model(batch), atol=1e-6)  # explicit and fused attention agree
    attention = details["attention"]
    lens = cfg.seq_lens
    expected = {f"trans_{t}_with_{s}" for t in "lav" for s in "lav" if s != t} | {f"trans_{t}_mem" for t in "lav"}
    assert set(attention) == expected
    w = attention["trans_l_with_a"]
    assert len(w) == cfg.layers and w[0].shape == (3, cfg.heads, lens["l"], lens["a"])
    assert attention["trans_a_mem"][0].shape == (3, cfg.heads, lens["a"], lens["a"])
    # causal per sample on real frames: a text step sees the audio up to the same point of the utterance
    allowed = ~causal_mask_from_padding(batch["mask_l"], batch["mask_a"])  # (B, T_l, T_a)
    checked = 0
    for i in range(3):
        for row in range(lens["l"]):
            visible = allowed[i, row] & ~batch["mask_a"][i]  # audio frames this text step may attend to
            if visible.any():
                assert not w[0][i, :, row, ~visible].any()
                assert torch.allclose(w[0][i, :, row].sum(-1), torch.ones(cfg.heads))
                checked += 1
            else:  # nothing visible: no attention at all
                assert not w[0][i, :, row].any()
    assert checked >= lens["l"]


# ---------------------------------------------------------------------------------------------------------
# 6. The causal mask


@pytest.mark.parametrize("n", [1, 2, 5, 50])
def test_causal_mask_square_is_the_future_mask(n):
    mask = causal_mask(n, n)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(n, n), 1).bool())


@pytest.mark.parametrize(("t", "s"), [(5, 7), (7, 5), (1, 4), (4, 1), (3, 9), (50, 375), (375, 50), (20, 400)])
def test_causal_mask_stretches_to_unequal_lengths(t, s):
    mask = causal_mask(t, s)
    assert mask.shape == (t, s) and mask.dtype == torch.bool
    assert not mask[-1].any()  # the last query sees every key
    seen = (~mask).sum(-1)  # keys seen by each query
    assert (seen[1:] >= seen[:-1]).all()  # a later query never sees fewer keys
    # each query sees a prefix of the keys, ending at the key whose relative end time (j+1)/S <= (i+1)/T
    for i in range(t):
        assert torch.equal(~mask[i], torch.arange(s) < seen[i])
        assert seen[i] == ((i + 1) * s) // t


def test_causal_mask_hand_example():
    # T=2 queries over S=4 keys: query 0 (first half of the time) sees keys 0-1, query 1 sees all four
    assert causal_mask(2, 4).tolist() == [[False, False, True, True], [False, False, False, False]]
    # T=4 over S=2: queries 0 sees nothing (ends before key 0 does), 1-2 see key 0, 3 sees both
    assert causal_mask(4, 2).tolist() == [[True, True], [False, True], [False, True], [False, False]]


# ---------------------------------------------------------------------------------------------------------
# 7. ModelConfig: JSON round trip and validation


@pytest.mark.parametrize("overrides", [
    {},
    {"setting": "full", "targets": ("a", "v"), "kt_concat": "time", "consistency": "l1", "kt_target": "trained"},
    {"setting": "language_vision", "targets": ("l",), "attn_dropout": {"l": 0.3, "a": 0.0, "v": 0.05},
     "lambda1": 0.5, "lambda2": 2.0, "causal": False},
])
@pytest.mark.parametrize(("dataset", "alignment"), [("mosi", "unaligned"), ("iemocap", "aligned")])
def test_config_round_trips_through_json(dataset, alignment, overrides):
    cfg = model_config(dataset, alignment, **overrides)
    text = cfg.to_json()
    assert json.loads(text)["targets"] == list(cfg.targets)  # plain JSON: the tuple is written as a list
    back = ModelConfig.from_json(text)
    assert back == cfg
    assert isinstance(back.targets, tuple) and back.targets == cfg.targets
    assert back.to_json() == text
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_config_targets_become_a_tuple():
    assert ModelConfig(targets=["a", "l"]).targets == ("a", "l")


def test_from_dict_names_unknown_fields():
    known = ModelConfig().to_dict()
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['hidden', 'nlevels'\]"):
        ModelConfig.from_dict({**known, "nlevels": 5, "hidden": 40})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"setting": "bogus"}, r"setting must be one of .*'bogus'"),
    ({"task": "ranking"}, r"task must be regression or classification"),
    ({"d": 30, "heads": 4}, r"d \(30\) must be a positive multiple of heads \(4\)"),
    ({"d": 0}, r"d \(0\) must be a positive multiple"),
    ({"text_dropout": 1.0}, r"text_dropout must lie in \[0, 1\), got 1.0"),
    ({"out_dropout": -0.1}, r"out_dropout must lie in \[0, 1\)"),
    ({"attn_dropout": {"l": 0.1, "a": 1.0, "v": 0.0}}, r"attn_dropout\[a\] must lie in \[0, 1\), got 1.0"),
    ({"targets": ("x",)}, r"targets must be distinct modalities .*\('x',\)"),
    ({"targets": ()}, r"targets must be distinct modalities"),
    ({"targets": ("a", "a")}, r"targets must be distinct modalities"),
    ({"layers": 0}, r"layers, mem_layers and kt_layers must be >= 1"),
    ({"kt_time_axis": "words"}, r"kt_time_axis must be auto, source, language or queries"),
    ({"kt_time_axis": "language", "setting": "kt_any"}, r"kt_time_axis='language' is for the audio target of 'kt'"),
    ({"kt_hat_weight": -1.0}, r"kt_hat_weight must be a finite number >= 0"),
    ({"kt_concat": "sum"}, r"kt_concat must be feature or time"),
    ({"kt_target": "moving"}, r"kt_target must be one of \('random', 'trained', 'run', 'run_memory'\), got 'moving'"),
    ({"consistency": "cosine"}, r"consistency must be l1 or l2"),
    ({"seq_lens": {"l": 50, "a": 50}}, r"seq_lens needs one entry per modality"),
])
def test_invalid_config_values_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_source_time_axis_needs_equal_lengths():
    with pytest.raises(ValueError, match=r"kt_time_axis='source' needs l, a, v of one length.*use 'queries'"):
        model_config("mosi", "unaligned", kt_time_axis="source")
    assert model_config("mosi", "unaligned").time_axis == "language"
    assert model_config("mosi", "unaligned", setting="kt_any").time_axis == "queries"
    assert model_config("mosi", "aligned").time_axis == "source"
    assert model_config("mosi", "aligned", kt_time_axis="queries").time_axis == "queries"


def test_paper_configuration_per_dataset():
    # Table 5: d=40, 4 layers; heads 10 / 8 / 10; kernels L/A/V 1/3/3 (IEMOCAP 3/5/3)
    mosi, mosei, iemocap = (model_config(d, "aligned") for d in ("mosi", "mosei", "iemocap"))
    assert (mosi.d, mosi.layers, mosi.heads, mosi.task) == (40, 4, 10, "regression")
    assert (mosei.heads, mosei.text_dropout, mosei.embed_dropout) == (8, 0.3, 0.1)
    assert (iemocap.heads, iemocap.task, iemocap.kernels) == (10, "classification", {"l": 3, "a": 5, "v": 3})
    assert iemocap.seq_lens == {"l": 20, "a": 20, "v": 20}
    assert model_config("mosi", "unaligned", d=16, heads=4).seq_lens == {"l": 50, "a": 375, "v": 500}
    # the official MulT code's defaults: d=30, 5 layers, 5 heads, kernel 1 everywhere, output dropout 0
    code = model_config("mosei", "unaligned", preset="mult_code")
    assert (code.d, code.layers, code.heads, code.out_dropout) == (30, 5, 5, 0.0)
    assert code.kernels == {"l": 1, "a": 1, "v": 1} and code.feature_dims == {"l": 300, "a": 74, "v": 35}
    assert ModelConfig.from_json(code.to_json()) == code
    with pytest.raises(ValueError, match=r"preset must be 'paper' or 'mult_code', got 'tiny'"):
        model_config("mosi", "aligned", preset="tiny")


# ---------------------------------------------------------------------------------------------------------
# 8. Checkpoints


@pytest.mark.parametrize(("setting", "alignment", "extra"), [
    ("kt", "unaligned", {"kt_concat": "time", "targets": ("a", "v")}),
    ("kt", "aligned", {}),
    ("full", "aligned", {}),
    ("vision_only", "unaligned", {}),
])
def test_checkpoint_round_trip(tmp_path, setting, alignment, extra):
    cfg = short_config(alignment, setting=setting, **extra, text_dropout=0.2, out_dropout=0.1)
    model = build(cfg, seed=5)
    batch = synth_batch(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # move the weights away from their initialisation
    for _ in range(3):
        out, details = model.train()(batch, return_details=True)
        opt.zero_grad()
        (task_loss(cfg, out, batch["y"]) + model.consistency_term(details)).backward()
        opt.step()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, metrics={"mae": 0.75, "epoch": 3}, extra={"note": "test"})
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))

    loaded, payload = load_checkpoint(path)
    assert loaded.cfg == cfg and isinstance(loaded.cfg.targets, tuple)
    assert payload["metrics"] == {"mae": 0.75, "epoch": 3} and payload["extra"] == {"note": "test"}
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
    assert model.state_dict().keys() == loaded.state_dict().keys()

    raw = torch.load(path, weights_only=True)  # plain types and tensors only: nothing pickled
    assert set(raw) == {"config", "state_dict", "metrics", "extra"}
    assert ModelConfig.from_dict(raw["config"]) == cfg
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw["state_dict"].items())


# ---------------------------------------------------------------------------------------------------------
# 9. Ablations: target modalities, delta's concatenation axis, L1 / L2 consistency


@pytest.mark.parametrize(("setting", "targets", "cross", "mem", "width"), [
    ("kt", ("a",), {"trans_a_with_l", "trans_a_with_v"}, {"trans_a_mem"}, 2),
    ("kt", ("l",), {"trans_l_with_a", "trans_l_with_v"}, {"trans_l_mem"}, 2),
    ("kt", ("v",), {"trans_v_with_l", "trans_v_with_a"}, {"trans_v_mem"}, 2),
    ("kt", ("l", "v"), {"trans_l_with_a", "trans_l_with_v", "trans_v_with_l", "trans_v_with_a"},
     {"trans_l_mem", "trans_v_mem"}, 4),
    ("full", ("a",), {"trans_a_with_l", "trans_a_with_v"}, {"trans_a_mem"}, 2),
    ("language_vision", ("l",), {"trans_l_with_v"}, {"trans_l_mem"}, 1),
    # no configured target among the setting's inputs: all its inputs are kept (documented fallback)
    ("language_vision", ("a",), {"trans_l_with_v", "trans_v_with_l"}, {"trans_l_mem", "trans_v_mem"}, 2),
    ("vision_only", ("l",), set(), {"trans_v_mem"}, 1),
])
def test_target_modality_ablation(setting, targets, cross, mem, width):
    cfg = short_config("unaligned", setting=setting, targets=targets)
    model = build(cfg)
    assert set(model.backbone.cross) == cross
    assert set(model.backbone.mem) == mem
    names = {n.split(".")[2] for n, _ in model.named_parameters() if n.startswith("backbone.cross.")}
    assert names == cross  # no other cross-modal transformer hides elsewhere
    model.train()
    batch = synth_batch(cfg)
    with torch.no_grad():
        out, details = model(batch, return_details=True)
    assert out.shape == (3, 1)
    assert details["pooled"].shape == (3, width * cfg.d)
    assert model.backbone.proj1.in_features == width * cfg.d
    for t in mem:  # each kept target's memory runs over its concatenated streams
        n_sources = max(1, sum(1 for c in cross if c.startswith(f"trans_{t[6]}_with_")))
        assert model.backbone.mem[t].layers[0].attn.d == n_sources * cfg.d


def test_audio_target_branch_queries_the_reconstruction():
    """targets=("a",) in kt: the kept branch is (L, V) -> A', whose queries are the reconstruction."""
    cfg = short_config("unaligned", setting="kt", targets=("a",))
    model = build(cfg).eval()
    with torch.no_grad():
        out, details = model(synth_batch(cfg), return_details=True, need_weights=True)
    w = details["attention"]["trans_a_with_l"][0]
    assert w.shape == (3, cfg.heads, cfg.seq_lens["l"], cfg.seq_lens["l"])  # f'_A lives on the word slots


def test_aligned_reconstruction_is_padding_only_where_both_sources_are():
    cfg = short_config("aligned", setting="kt")
    batch = synth_batch(cfg, batch_size=3, seed=2)
    # make the sources' padding differ: sample 0 loses 3 more vision frames, sample 1 3 more language frames
    for i, m in ((0, "v"), (1, "l")):
        first_real = int(batch[f"mask_{m}"][i].sum())
        batch[m][i, : first_real + 3] = 0.0
        batch[f"mask_{m}"][i] = (batch[m][i] == 0).all(-1)
    assert not torch.equal(batch["mask_l"] & batch["mask_v"], batch["mask_l"] | batch["mask_v"])
    model = build(cfg)
    for training in (True, False):
        with torch.no_grad():
            _, details = model.train(training)(batch, return_details=True)
        assert torch.equal(details["mask_a_hat"], batch["mask_l"] & batch["mask_v"])


@pytest.mark.parametrize("alignment", ["aligned", "unaligned"])
def test_time_concatenation_gives_the_same_reconstruction_shape(alignment):
    shapes = {}
    for concat in ("feature", "time"):
        cfg = short_config(alignment, setting="kt", kt_concat=concat)
        model = build(cfg)
        assert hasattr(model.kt.recon["a"], "fuse_in") == (concat == "feature")
        assert hasattr(model.kt.recon["a"], "segment") == (concat == "time")
        batch = synth_batch(cfg)
        model.train()
        with torch.no_grad():
            out, details = model(batch, return_details=True)
        assert torch.isfinite(out).all() and torch.isfinite(details["f_a_hat"]).all()
        assert torch.isfinite(details["loss_va"])
        shapes[concat] = details["f_a_hat"].shape
    t_hat = SHORT[alignment]["seq_lens"]["l"]  # the shared axis (aligned) or the word slots (unaligned)
    assert shapes["feature"] == shapes["time"] == (3, t_hat, 8)


def test_consistency_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]],
                         [[2.0, 0.0], [7.0, 7.0], [7.0, 7.0]]])  # (B=2, T=3, d=2)
    target = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    frames = torch.tensor([[True, True, False], [True, False, False]])  # real frames to compare
    # real-frame errors: sample 0 frame 0 (1, 2), frame 1 (-1, -3); sample 1 frame 0 (2, 0): 3 frames x 2 dims
    # l2: (1 + 4 + 1 + 9 + 4 + 0) / 6 = 19 / 6;   l1: (1 + 2 + 1 + 3 + 2 + 0) / 6 = 9 / 6 = 1.5
    # (a mean of per-sample means would give (15/4 + 4/2) / 2 = 2.875 and (7/4 + 2/2) / 2 = 1.375)
    assert consistency_loss(pred, target, frames, "l2").item() == pytest.approx(19 / 6)
    assert consistency_loss(pred, target, frames, "l1").item() == pytest.approx(1.5)
    # nothing to compare: zero, not NaN
    assert consistency_loss(pred, target, torch.zeros_like(frames), "l2").item() == 0.0


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_model_uses_the_configured_consistency_loss(kind):
    cfg = short_config("unaligned", setting="kt", consistency=kind, lambda1=0.25, lambda2=3.0)
    model = build(cfg).train()
    batch = synth_batch(cfg)
    batch["present"][1, 1] = False
    with torch.no_grad():
        _, details = model(batch, return_details=True)
    _, real = model.audio_target(batch)  # f_A averaged over each word's span: the word slots with audio frames
    frames = real & ~details["mask_a_hat"] & batch["present"][:, 1:2]
    diff_va = details["a_from_v"] - details["f_a"]
    diff_la = details["a_from_l"] - details["f_a"]
    err = (lambda x: x.abs()) if kind == "l1" else (lambda x: x.pow(2))
    expected_va = err(diff_va)[frames].mean()  # (real frames, d) -> mean over frames and feature dims
    expected_la = err(diff_la)[frames].mean()
    assert details["loss_va"].item() == pytest.approx(expected_va.item(), rel=1e-5)
    assert details["loss_la"].item() == pytest.approx(expected_la.item(), rel=1e-5)
    term = model.consistency_term(details)
    assert term.item() == pytest.approx(0.25 * expected_va.item() + 3.0 * expected_la.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 10. Padding frames and absent audio do not enter the consistency loss


def test_consistency_loss_ignores_padding_frames():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    frames = torch.rand(3, 6, generator=g) < 0.5
    frames[0, 0] = True
    for kind in ("l1", "l2"):
        loss = consistency_loss(pred, target, frames, kind)
        pred2, target2 = pred.clone(), target.clone()
        pred2[~frames] = 1e3 * torch.randn(int((~frames).sum()), 4, generator=g)
        target2[~frames] = float("-1e3")
        assert torch.equal(consistency_loss(pred2, target2, frames, kind), loss)
        pred2[frames] += 1.0  # a change on a real frame does count
        assert not torch.equal(consistency_loss(pred2, target2, frames, kind), loss)


def test_kt_training_loss_ignores_audio_padding_frames():
    # audio kernel 1: a padding frame's values cannot leak into its real neighbour through the projection
    cfg = short_config("unaligned", setting="kt", kernels={"l": 1, "a": 1, "v": 3})
    model = build(cfg).train()
    batch = synth_batch(cfg)
    assert batch["mask_a"].any()
    changed = dict(batch, a=torch.where(batch["mask_a"][..., None], 5.0, batch["a"]))  # same masks
    with torch.no_grad():
        _, details = model(batch, return_details=True)
        _, details_changed = model(changed, return_details=True)
    real = model.audio_target(batch)[1]  # word slots that hold real audio frames
    assert real.any() and torch.equal(real, model.audio_target(changed)[1])
    assert torch.allclose(details["f_a"][real], details_changed["f_a"][real], atol=1e-6)
    for name in ("loss_va", "loss_la"):
        assert torch.allclose(details[name], details_changed[name], rtol=1e-6, atol=0), name


@pytest.mark.parametrize("alignment", ["aligned", "unaligned"])
def test_samples_without_audio_do_not_enter_the_consistency_loss(alignment):
    cfg = short_config(alignment, setting="kt")
    model = build(cfg).train()
    batch = synth_batch(cfg, batch_size=4)
    batch["present"][0, 1] = False  # sample 0's audio is marked absent (its features are still there)
    g = torch.Generator().manual_seed(9)
    other = dict(batch, a=batch["a"].clone())
    other["a"][0] = 100 * torch.randn(other["a"][0].shape, generator=g)
    with torch.no_grad():
        _, details = model(batch, return_details=True)
        _, details_other = model(other, return_details=True)
        rest = {k: v[1:] for k, v in batch.items()}  # the same batch without sample 0
        _, details_rest = model(rest, return_details=True)
        all_present = dict(batch, present=torch.ones_like(batch["present"]))
        _, details_all = model(all_present, return_details=True)
    for name in ("loss_va", "loss_la"):
        assert torch.equal(details[name], details_other[name]), name
        assert torch.allclose(details[name], details_rest[name], rtol=1e-5), name
        assert not torch.allclose(details[name], details_all[name], rtol=1e-4), name  # sample 0 did count
    # all audio absent: nothing to compare, zero consistency term and no gradient trouble
    none_present = dict(batch, present=torch.zeros_like(batch["present"]))
    _, details_none = model(none_present, return_details=True)
    assert details_none["loss_va"].item() == 0.0 and model.consistency_term(details_none).item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# 11. Parameter counts at the paper's MOSI configuration


def test_parameter_counts_at_the_paper_mosi_config():
    models = {s: KTModel(model_config("mosi", "aligned", setting=s)) for s in SETTINGS}
    counts = {s: count_parameters(m) for s, m in models.items()}
    assert counts["vision_only"] < counts["language_only"] < counts["language_vision"] < counts["full"] < counts["kt"]
    full, kt = models["full"], models["kt"]
    assert full.kt is None and kt.kt is not None
    # kt = full + the knowledge-transfer network (+ any projection full does not have: none, full projects audio too)
    extra_projections = count_parameters(kt.proj) - count_parameters(full.proj)
    assert set(kt.proj) == set(full.proj) == {"l", "a", "v"} and extra_projections == 0
    assert count_parameters(kt.backbone) == count_parameters(full.backbone)
    assert counts["kt"] - counts["full"] == count_parameters(kt.kt) + extra_projections
    # count_parameters counts each parameter once and all of them
    assert counts["kt"] == sum(count_parameters(c) for c in (kt.proj, kt.kt, kt.backbone))
    # the projections by hand (Conv1d without bias, kernels L/A/V 1/3/3, d=40): 300*40*1 + 5*40*3 + 20*40*3
    assert count_parameters(full.proj) == 300 * 40 + 5 * 40 * 3 + 20 * 40 * 3
    assert count_parameters(models["vision_only"].proj) == 20 * 40 * 3


def test_load_audio_encoder_copies_the_audio_projection():
    cfg = short_config("aligned", setting="kt")
    kt, full = build(cfg, seed=1), build(short_config("aligned", setting="full"), seed=2)
    assert not torch.equal(kt.proj["a"].conv.weight, full.proj["a"].conv.weight)
    load_audio_encoder(kt, full)
    assert torch.equal(kt.proj["a"].conv.weight, full.proj["a"].conv.weight)
    assert kt.proj["a"].conv.weight.data_ptr() != full.proj["a"].conv.weight.data_ptr()  # a copy, not shared


# ---------------------------------------------------------------------------------------------------------
# Attention paths: the reference path and key dropout


def test_reference_and_fused_paths_agree_in_eval():
    cfg = short_config("unaligned", setting="kt")
    fused = build(cfg).eval()
    reference = KTModel(ModelConfig.from_dict({**cfg.to_dict(), "attn_impl": "reference"})).eval()
    reference.load_state_dict(fused.state_dict())
    batch = synth_batch(cfg)
    with torch.no_grad():
        assert torch.allclose(fused(batch), reference(batch), atol=1e-5)


def test_key_dropout_removes_whole_keys_and_renormalises():
    torch.manual_seed(0)
    att = CrossModalAttention(8, 2, dropout=0.5, dropout_on="keys").train()
    query, source = torch.randn(3, 5, 8), torch.randn(3, 6, 8)
    _, w = att(query, source, need_weights=True)  # (B, H, T, S)
    dropped = (w == 0).all(2)  # (B, H, S): a key dropped for a sample and head is dropped for every query
    assert dropped.any() and not dropped.all()
    assert ((w == 0) == dropped[:, :, None, :]).all(), "zeros come only from whole dropped keys"
    assert torch.allclose(w.sum(-1), torch.ones(3, 2, 5)), "the remaining keys are renormalised by the softmax"
    att.eval()
    _, w_eval = att(query, source, need_weights=True)
    assert (w_eval > 0).all()


@pytest.mark.parametrize(("field", "value"), [("attn_impl", "flash"), ("attn_dropout_on", "rows")])
def test_attention_options_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------
# The consistency target: without dropout, from a trained run, the placebo, delta's supervision


WITH_DROPOUT = dict(text_dropout=0.2, embed_dropout=0.3, relu_dropout=0.3, res_dropout=0.3, out_dropout=0.1,
                    attn_dropout={"l": 0.3, "a": 0.3, "v": 0.3})


@pytest.mark.parametrize("alignment", ["aligned", "unaligned"])
@pytest.mark.parametrize("target", ["random", "trained"])
def test_consistency_target_has_no_dropout_in_training(alignment, target):
    """f_A is the same twice in training mode (dropout on), and equals the eval-mode target."""
    cfg = short_config(alignment, setting="kt", kt_target=target, **WITH_DROPOUT)
    model = build(cfg).train()
    batch = synth_batch(cfg)
    first = model(batch, return_details=True)[1]
    second = model(batch, return_details=True)[1]
    assert not torch.equal(first["a_from_v"], second["a_from_v"]), "dropout is on elsewhere"
    assert torch.equal(first["f_a"], second["f_a"])
    assert model.training and model.kt.enc_a.training, "the encoder's mode is restored"
    assert torch.allclose(first["f_a"], model.audio_target(batch)[0], atol=1e-6)


def test_target_from_a_run_is_that_runs_projected_audio_and_stays_fixed():
    cfg = short_config("aligned", setting="kt", kt_target="run")
    kt, full = build(cfg, seed=1), build(short_config("aligned", setting="full"), seed=2)
    assert isinstance(kt.kt.enc_a, nn.Identity), "with kt_target='run', f_A is the run's projection itself"
    load_audio_encoder(kt, full)
    batch = synth_batch(cfg)
    _, details = kt.train()(batch, return_details=True)
    with torch.no_grad():
        expected = full.proj["a"](batch["a"])
    assert torch.equal(details["f_a"], expected)
    (details["loss_va"] + details["loss_la"]).backward()
    assert all(not p.requires_grad and p.grad is None for p in kt.proj["a"].parameters())
    with pytest.raises(ValueError, match=r"has no audio projection; use a run that saw real audio"):
        load_audio_encoder(kt, build(short_config("aligned", setting="language_vision")))


def test_memory_target_is_the_audio_only_runs_memory_output_over_its_audio():
    cfg = short_config("aligned", setting="kt", kt_target="run_memory")
    kt, audio_only = build(cfg, seed=1), build(short_config("aligned", setting="audio_only"), seed=2).eval()
    load_audio_encoder(kt, audio_only)
    batch = synth_batch(cfg)
    _, details = kt.train()(batch, return_details=True)  # training mode: the target is still computed in eval mode
    with torch.no_grad():
        expected = audio_only.backbone.mem["trans_a_mem"](audio_only.proj["a"](batch["a"]),
                                                           x_mask=batch["mask_a"])[0]
    assert torch.allclose(details["f_a"], expected, atol=1e-6)
    (details["loss_va"] + details["loss_la"]).backward()
    assert all(not p.requires_grad and p.grad is None for p in kt.kt.enc_a.parameters())
    with pytest.raises(ValueError, match=r"reads the memory of an audio_only run, got a 'full' run"):
        load_audio_encoder(kt, build(short_config("aligned", setting="full")))


def test_derangement_pairs_every_sample_with_another():
    torch.manual_seed(0)
    for n in (2, 3, 10):
        perm = derangement(n)
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()
    assert derangement(1).tolist() == [0]


def test_placebo_target_comes_from_another_sample_of_the_batch():
    cfg = short_config("aligned", setting="kt", kt_target_shuffle=True)
    model = build(cfg).train()
    batch = synth_batch(cfg, batch_size=4)
    torch.manual_seed(5)
    with torch.no_grad():
        f_a = model(batch, return_details=True)[1]["f_a"]
    torch.manual_seed(5)
    perm = derangement(4)  # the model draws the pairing first from the same random stream
    own = model.audio_target(batch)[0]
    assert torch.allclose(f_a, own[perm], atol=1e-6)
    assert not torch.allclose(f_a, own, atol=1e-3)


def test_supervising_delta_adds_its_weighted_loss_to_the_consistency_term():
    base = short_config("aligned", setting="kt", lambda1=0.5, lambda2=2.0)
    batch = synth_batch(base)
    terms = {}
    for weight in (0.0, 3.0):
        model = build(ModelConfig.from_dict({**base.to_dict(), "kt_hat_weight": weight})).train()
        with torch.no_grad():
            details = model(batch, return_details=True)[1]
            terms[weight] = model.consistency_term(details).item()
        hat = details["f_a_hat"]
        frames = model.audio_target(batch)[1] & ~details["mask_a_hat"]
        expected = (hat - details["f_a"]).pow(2)[frames].mean().item()
        assert details["loss_hata"].item() == pytest.approx(expected, rel=1e-5)
    assert terms[3.0] - terms[0.0] == pytest.approx(3.0 * details["loss_hata"].item(), rel=1e-4)


def test_memory_depth_follows_mult():
    assert ModelConfig(layers=4).mem_layers == 4 and ModelConfig(layers=1).mem_layers == 3
    assert ModelConfig(layers=5, mem_layers=2).mem_layers == 2
    assert model_config("mosi", "aligned").mem_layers == 4  # the paper's 4 layers


# ---------------------------------------------------------------------------------------------------------
# Unaligned f'_A: on the word slots, never presenting slots outside the utterance as real frames


def test_span_mask_by_hand():
    # 2 real queries of 3 steps (front padding 1), 4 real keys of 5: query 0 covers [0, 1/2), query 1 [1/2, 1)
    query_pad = torch.tensor([[True, False, False]])
    key_pad = torch.tensor([[True, False, False, False, False]])
    blocked = span_mask_from_padding(query_pad, key_pad)[0]
    assert blocked[0].tolist() == [False] * 5  # a padding query is not constrained
    assert blocked[1].tolist() == [True, False, False, True, True]  # keys 0, 1 (spans [0, 1/4), [1/4, 1/2))
    assert blocked[2].tolist() == [True, True, True, False, False]
    # 2 queries over 3 keys: the middle key [1/3, 2/3) overlaps both halves
    blocked = span_mask_from_padding(torch.tensor([[False, False]]), torch.tensor([[False, False, False]]))[0]
    assert blocked.tolist() == [[False, False, True], [True, False, False]]


def test_pool_onto_averages_each_words_frames_by_hand():
    # 2 word slots (both real), 5 frames of which 4 are real: centres 1/8, 3/8 -> word 0; 5/8, 7/8 -> word 1
    values = torch.tensor([[[9.0], [1.0], [3.0], [5.0], [7.0]]])
    value_pad = torch.tensor([[True, False, False, False, False]])
    pooled, real = pool_onto(values, value_pad, torch.tensor([[False, False]]))
    assert pooled[0, :, 0].tolist() == [2.0, 6.0] and real.tolist() == [[True, True]]
    # 3 words, 1 frame: only the middle word holds it; the others are not real and are zero
    pooled, real = pool_onto(torch.tensor([[[4.0]]]), torch.tensor([[False]]), torch.tensor([[False, False, False]]))
    assert real.tolist() == [[False, True, False]] and pooled[0, :, 0].tolist() == [0.0, 4.0, 0.0]


def test_unaligned_reconstruction_is_real_only_inside_the_utterance():
    cfg = short_config("unaligned", setting="kt")
    model = build(cfg).eval()
    batch = synth_batch(cfg, batch_size=3, seed=4)
    assert batch["mask_l"].any(), "some word slots are padding"
    with torch.no_grad():
        _, details = model(batch, return_details=True, need_weights=True)
    assert torch.equal(details["mask_a_hat"], batch["mask_l"])
    # the backbone's (A') -> L branch gives padding slots of f'_A no weight
    w = details["attention"]["trans_l_with_a"][0]  # (B, H, T_l, T_l)
    assert (w.masked_select(batch["mask_l"][:, None, None, :].expand_as(w)) == 0).all()
    # theta's word slots read only vision frames of their own span (kt_layers=1: one cross-modal layer)
    recon = model.kt.recon["a"]
    g = torch.Generator().manual_seed(1)
    f_v = torch.randn(3, cfg.seq_lens["v"], cfg.d, generator=g)
    masks = {"l": batch["mask_l"], "v": batch["mask_v"]}
    outside = span_mask_from_padding(batch["mask_l"], batch["mask_v"])[:, -1]  # (B, T_v): not in the last word
    f_v2 = torch.where(outside[..., None], f_v + 3.0 * torch.randn(f_v.shape, generator=g), f_v)
    f_l = torch.randn(3, cfg.seq_lens["l"], cfg.d, generator=g)
    with torch.no_grad():
        out1 = recon({"l": f_l, "v": f_v}, masks)["a_from_v"]
        out2 = recon({"l": f_l, "v": f_v2}, masks)["a_from_v"]
    assert out1.shape == (3, cfg.seq_lens["l"], cfg.d)
    assert torch.allclose(out1[:, -1], out2[:, -1], atol=1e-5)  # the last word reads only its own frames
    assert not torch.allclose(out1[:, -2], out2[:, -2], atol=1e-3)  # the word before reads changed frames
