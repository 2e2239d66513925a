"""The speed-ups of ktlib.model compute what the plain code computes: dropout with F.dropout's semantics, masks built
once per stack equal to the per-layer ones, the explicit CPU attention and its gradient, the causal self-attention
with real frames moved to the front, and the same seed giving the same training step with every dropout on.

No test here times anything: speed is measured by ``python -m ktlib.bench``, never asserted.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ktlib.layers as layers_module
from ktlib.config import model_config
from ktlib.layers import (
    AttentionMask,
    Dropout,
    ExplicitAttention,
    attend,
    causal_mask,
    causal_mask_from_padding,
    dropout,
    dropout_mask,
)
from ktlib.model import (
    CrossModalAttention,
    KTModel,
    SinusoidalPositions,
    TransformerEncoder,
)
from ktlib.train import make_optimizer, task_loss


def front_padding(lengths, t: int) -> torch.Tensor:
    """(B, T) True on padding, the real frames at the end."""
    return torch.arange(t)[None, :] < (t - torch.tensor(lengths))[:, None]


# ---------------------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_zeroes_at_rate_p_and_scales_survivors_by_one_over_keep(p):
    torch.manual_seed(0)
    n = 1_000_000
    x = torch.ones(n)
    y = dropout(x, p)
    zeros = (y == 0).float().mean().item()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(zeros - p) < 5 * sd + 2**-16  # a binomial bound (5 sd), plus p's rounding to a multiple of 2**-16
    survivors = y[y != 0]
    assert torch.equal(survivors, torch.full_like(survivors, 1.0 / (1.0 - p)))  # exactly F.dropout's scale
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n) + 2**-14  # unbiased in expectation


def test_dropout_masks_are_independent_of_position_and_between_calls():
    torch.manual_seed(1)
    kept = dropout_mask((400, 500), 0.5) > 0  # (rows, columns)
    sd = math.sqrt(0.25 / 500)
    assert (kept.float().mean(1) - 0.5).abs().max() < 6 * sd  # every row drops about half
    assert (kept.float().mean(0) - 0.5).abs().max() < 6 * math.sqrt(0.25 / 400)  # every column too
    other = dropout_mask((400, 500), 0.5) > 0
    assert abs((kept == other).float().mean().item() - 0.5) < 0.01  # a second call draws afresh


def test_dropout_is_seeded_identity_in_eval_and_passes_gradients_through_the_mask():
    x = torch.randn(64, 33, requires_grad=True)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    torch.manual_seed(5)
    a = dropout(x, 0.3)
    torch.manual_seed(5)
    b = dropout(x, 0.3)
    assert torch.equal(a, b)  # same seed, same mask
    a.sum().backward()
    assert torch.equal(x.grad, torch.where(a != 0, 1 / 0.7, 0.0).float())  # d(out)/dx is the mask itself
    assert torch.equal(dropout(x.detach(), 1.0), torch.zeros_like(x))  # p = 1 drops everything, as F.dropout


def test_dropout_module_is_an_nn_dropout_with_no_state():
    layer = Dropout(0.25)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.25 and layer.state_dict() == {}
    x = torch.randn(10, 20)
    assert torch.equal(layer.eval()(x), x)
    torch.manual_seed(2)
    out = layer.train()(x)
    torch.manual_seed(2)
    assert torch.equal(out, dropout(x, 0.25))


# ---------------------------------------------------------------------------------------------------------
# Masks built once, position codes cached


def _per_layer_mask(kpm, attn_mask, b, t, s):
    """How the attention built its masks in every layer before: (B, 1, T, S) blocked with empty rows opened."""
    blocked = kpm[:, None, None, :].expand(b, 1, t, s)
    am = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None]
    blocked = blocked | am
    empty = blocked.all(-1, keepdim=True)
    return blocked & ~empty, empty


@pytest.mark.parametrize(("t", "s"), [(6, 6), (4, 9), (9, 4)])
def test_mask_built_once_equals_the_per_layer_masks(t, s):
    q_pad = front_padding([t, t - 2, 1, 0], t)  # the last sample's query is all padding
    k_pad = front_padding([s, 1, s - 1, 2], s)
    for attn_mask in (causal_mask_from_padding(q_pad, k_pad), causal_mask(t, s)):
        blocked, empty = _per_layer_mask(k_pad, attn_mask, 4, t, s)
        mask = AttentionMask.build(k_pad, attn_mask)
        assert torch.equal(mask.empty.expand_as(empty), empty)
        assert mask.has_empty == bool(empty.any())
        bias = mask.bias(torch.float32)
        assert torch.equal(bias.expand_as(blocked), torch.zeros(blocked.shape).masked_fill(blocked, float("-inf")))
        assert mask.bias(torch.float32) is bias  # made once


def test_encoder_with_masks_built_once_equals_layer_by_layer_attention_with_its_own_masks():
    torch.manual_seed(0)
    enc = TransformerEncoder(8, 2, layers=3, causal=True).eval()
    x, src = torch.randn(3, 6, 8), torch.randn(3, 9, 8)
    x_pad, s_pad = front_padding([6, 3, 1], 6), front_padding([9, 2, 5], 9)
    with torch.no_grad():
        out = enc(x, source=src, source_mask=s_pad, x_mask=x_pad)[0]
        h, kv = enc._embed(x), enc._embed(src)
        attn_mask = causal_mask_from_padding(x_pad, s_pad)
        for layer in enc.layers:  # every layer builds its masks from the raw ones, as the code did before
            z = layer.attn(layer.norm_attn(h), layer.norm_attn(kv), key_padding_mask=s_pad, attn_mask=attn_mask)[0]
            h = h + z
            h = h + layer.ffn(layer.norm_ffn(h))
        assert torch.equal(out, enc.norm(h))


def test_position_codes_are_cached_per_length_device_and_dtype():
    codes = SinusoidalPositions(6)
    first = codes(5)
    assert codes(5) is first and codes(7).shape == (7, 6)
    assert codes(5, dtype=torch.float64).dtype == torch.float64
    assert torch.equal(first, SinusoidalPositions(6)._codes(5))
    assert codes.state_dict() == {}  # nothing cached reaches a checkpoint


# ---------------------------------------------------------------------------------------------------------
# Explicit attention on the CPU


def test_explicit_attention_gradient_matches_finite_differences():
    torch.manual_seed(0)
    b, h, t, s, dk = 2, 3, 5, 7, 4
    q, k, v = (torch.randn(b, h, n, dk, dtype=torch.double, requires_grad=True) for n in (t, s, s))
    blocked = torch.rand(b, 1, t, s) < 0.4
    blocked[..., 0] = False
    bias = torch.zeros(b, 1, t, s, dtype=torch.double).masked_fill(blocked, float("-inf"))
    keep = dropout_mask((b, h, t, s), 0.3).double()
    for kp in (None, keep):
        for bs in (None, bias):
            assert torch.autograd.gradcheck(lambda q, k, v, bs=bs, kp=kp: ExplicitAttention.apply(q, k, v, bs, kp, 0.5),
                                            (q, k, v))


def test_explicit_attention_equals_the_fused_kernel_and_dropout_of_the_weights():
    torch.manual_seed(0)
    b, h, t, s, dk = 3, 2, 6, 9, 4
    q, k, v = (torch.randn(b, h, n, dk, requires_grad=True) for n in (t, s, s))
    bias = torch.zeros(b, 1, t, s).masked_fill(torch.rand(b, 1, t, s) < 0.3, float("-inf"))
    bias[..., -1] = 0.0
    out = ExplicitAttention.apply(q, k, v, bias, None, dk ** -0.5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-6)
    keep = dropout_mask((b, h, t, s), 0.5)
    weights = ((q @ k.transpose(-2, -1)) * dk ** -0.5 + bias).softmax(-1)
    assert torch.allclose(ExplicitAttention.apply(q, k, v, bias, keep, dk ** -0.5), (weights * keep) @ v, atol=1e-6)


def test_explicit_attention_in_blocks_of_samples_gives_the_same_bits(monkeypatch):
    """Blocks of samples change where the temporaries live, not the arithmetic: outputs and gradients are bitwise
    those of one block, for a per-sample and a shared bias, with and without dropout of the weights."""
    torch.manual_seed(0)
    b, h, t, s, dk = 5, 2, 6, 9, 4
    q, k, v = (torch.randn(b, h, n, dk, requires_grad=True) for n in (t, s, s))
    grad = torch.randn(b, h, t, dk)
    for bias_samples in (b, 1):
        bias = torch.zeros(bias_samples, 1, t, s).masked_fill(torch.rand(bias_samples, 1, t, s) < 0.3, float("-inf"))
        bias[..., -1] = 0.0
        for keep in (None, dropout_mask((b, h, t, s), 0.3)):
            results = []
            for block in (b * h * t * s, 2 * h * t * s):  # one block; blocks of 2, 2 and 1 samples
                monkeypatch.setattr(layers_module, "BLOCK_SCORES", block)
                assert len(layers_module._sample_blocks(b, h * t * s)) == (1 if block > 2 * h * t * s else 3)
                for x in (q, k, v):
                    x.grad = None
                out = ExplicitAttention.apply(q, k, v, bias, keep, dk ** -0.5)
                out.backward(grad)
                results.append([out.detach().clone()] + [x.grad.clone() for x in (q, k, v)])
            assert all(torch.equal(one, blocks) for one, blocks in zip(*results, strict=True))


def test_fused_and_explicit_cpu_paths_agree(monkeypatch):
    torch.manual_seed(0)
    att = CrossModalAttention(8, 2).eval()
    query, source = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    kpm = front_padding([7, 1, 0], 7)  # the last sample sees no key at all
    mask = causal_mask_from_padding(front_padding([5, 2, 4], 5), kpm)
    with torch.no_grad():
        explicit = att(query, source, key_padding_mask=kpm, attn_mask=mask)[0]  # small: the explicit path
        monkeypatch.setattr(layers_module, "SMALL_ATTENTION", 0)
        fused = att(query, source, key_padding_mask=kpm, attn_mask=mask)[0]
    assert torch.allclose(explicit, fused, atol=1e-6)
    assert torch.allclose(fused[2], att.out_proj.bias.expand(5, 8))  # no key: zero attention result


# ---------------------------------------------------------------------------------------------------------
# Causal self-attention with the real frames moved to the front


def test_real_first_causal_mask_is_the_front_padded_one_moved():
    t, lengths = 7, [7, 4, 1, 0]
    pad = front_padding(lengths, t)
    real = (~pad).sum(1, keepdim=True)
    moved = AttentionMask.causal_real_first(real, t, chunk=3)
    # (B, T, T) in front-padded order: padding keys are blocked, and so are padding rows (they get zeros)
    expected = causal_mask_from_padding(pad, pad) | pad[:, None, :] | pad[:, :, None]
    order = (torch.arange(t)[None, :] + t - real) % t  # moved position -> front-padded position
    for i, n in enumerate(lengths):
        back = expected[i][order[i]][:, order[i]]  # rows and columns in the moved order
        assert torch.equal(moved.blocked[i, 0], back), f"sample {i} ({n} real frames)"
    assert moved.chunks == ((0, 3), (3, 6), (6, 7))
    for a, b in moved.chunks:  # rows [a, b) see no key from b on
        assert moved.blocked[:, :, a:b, b:].all()


@pytest.mark.parametrize("training", [False, True])
def test_long_causal_self_attention_equals_the_plain_stack(monkeypatch, training):
    torch.manual_seed(0)
    enc = TransformerEncoder(8, 2, layers=2, causal=True).train(training)  # no dropout: training is exact too
    x = torch.randn(4, 12, 8, requires_grad=True)
    pad = front_padding([12, 5, 1, 0], 12)
    monkeypatch.setattr(layers_module, "CAUSAL_CHUNK", 4)  # 12 >= 2 * 4: the real-first path
    real = ~pad
    moved = enc(x, x_mask=pad)[0]
    grad_moved = torch.autograd.grad(moved[real].square().sum(), x)[0]
    monkeypatch.setattr(layers_module, "CAUSAL_CHUNK", 100)  # the plain path
    plain = enc(x, x_mask=pad)[0]
    grad_plain = torch.autograd.grad(plain[real].square().sum(), x)[0]
    # the real frames: padding rows differ (zero attention there, attention over the real keys in the plain path),
    # and no real frame reads them
    assert torch.allclose(moved[real], plain[real], atol=1e-6)
    assert torch.allclose(grad_moved, grad_plain, atol=1e-5)
    assert torch.equal(grad_moved[pad], torch.zeros_like(grad_moved[pad]))


def test_causal_chunks_leave_out_samples_without_real_rows_and_change_nothing():
    """A chunk of rows computes only the samples with a real row in it; the rows left out are zero, as the full
    mask makes them (a padding row sees no key)."""
    torch.manual_seed(0)
    t, lengths = 12, [12, 5, 1, 0, 9]
    n_real = torch.tensor(lengths)[:, None]
    q, k, v = (torch.randn(5, 2, t, 4, requires_grad=True) for _ in range(3))
    chunked = AttentionMask.causal_real_first(n_real, t, chunk=4)  # chunks [0,4) [4,8) [8,12): 4, 3, 2 samples live
    whole = AttentionMask(chunked.blocked)  # the same mask, one fused call over every row and sample
    grad = torch.randn(5, 2, t, 4)
    results = []
    for mask in (chunked, whole):
        for x in (q, k, v):
            x.grad = None
        out = attend(q, k, v, mask, 0.0)[0]
        out.backward(grad)
        results.append([out.detach().clone()] + [x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    sample, row = (torch.arange(t)[None, :] >= n_real).nonzero(as_tuple=True)  # every padding row
    assert torch.equal(results[0][0][sample, :, row], torch.zeros(len(sample), 2, 4))


# ---------------------------------------------------------------------------------------------------------
# Training with every dropout on: same seed, same step


def _one_step(seed: int):
    cfg = model_config("mosi", "aligned", setting="kt", d=8, heads=2, layers=1, mem_layers=1, kt_layers=1,
                                 seq_lens={"l": 12, "a": 12, "v": 12})
    torch.manual_seed(0)
    model = KTModel(cfg).train()
    opt = make_optimizer(model, 1e-3)
    g = torch.Generator().manual_seed(3)
    batch = {m: torch.randn(4, 12, cfg.feature_dims[m], generator=g) for m in "lav"}
    batch.update({f"mask_{m}": front_padding([12, 8, 3, 1], 12) for m in "lav"})
    batch["y"] = torch.randn(4, 1, generator=g)
    torch.manual_seed(seed)
    out, details = model(batch, return_details=True)
    loss = task_loss(out, batch["y"], cfg.task) + model.consistency_term(details)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seed_gives_the_same_training_step_with_dropout_on():
    assert model_config("mosi").attn_dropout["l"] > 0  # the paper's dropouts are on here
    loss_a, params_a = _one_step(7)
    loss_b, params_b = _one_step(7)
    loss_c, _ = _one_step(8)
    assert torch.equal(loss_a, loss_b) and torch.equal(params_a, params_b)
    assert not torch.equal(loss_a, loss_c)  # another seed draws other dropout masks


# ---------------------------------------------------------------------------------------------------------
# Leaving out the leading steps that are padding in every sample


NO_DROPOUT = dict(text_dropout=0.0, embed_dropout=0.0, attn_dropout={"l": 0.0, "a": 0.0, "v": 0.0},
                  relu_dropout=0.0, res_dropout=0.0, out_dropout=0.0)


def _padded_batch(cfg, lengths: dict, t: int = 12, seed: int = 3) -> dict:
    """A front-padded batch whose padding frames are zeros, as the loader gives them."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for m in "lav":
        pad = front_padding(lengths[m], t)
        batch[m] = torch.randn(len(lengths[m]), t, cfg.feature_dims[m], generator=g).masked_fill(pad[..., None], 0.0)
        batch[f"mask_{m}"] = pad
    batch["y"] = torch.randn(len(lengths["l"]), 1, generator=g)
    batch["present"] = torch.ones(len(lengths["l"]), 3, dtype=torch.bool)
    return batch


LENGTHS = {"l": [7, 5, 3, 1], "a": [6, 5, 2, 0], "v": [7, 4, 3, 2]}  # at most 7 of 12 real: 5 steps left out


@pytest.mark.parametrize("setting", ["kt", "full", "language_vision"])
def test_skipping_leading_padding_computes_the_same_training_pass(setting):
    cfg = model_config("mosi", "aligned", setting=setting, d=8, heads=2, layers=1, mem_layers=2, kt_layers=1,
                       seq_lens={"l": 12, "a": 12, "v": 12}, **NO_DROPOUT)
    torch.manual_seed(0)
    model = KTModel(cfg).train()
    batch = _padded_batch(cfg, LENGTHS)
    assert model.leading_padding(batch) == 5
    results = []
    for skip in (True, False):
        out, details = model(batch, return_details=True, skip_padding=skip)
        loss = task_loss(out, batch["y"], cfg.task) + model.consistency_term(details)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        results.append((out, loss, grads, details))
    (out_s, loss_s, grads_s, det_s), (out_f, loss_f, grads_f, det_f) = results
    assert torch.allclose(out_s, out_f, atol=1e-6) and torch.allclose(loss_s, loss_f, atol=1e-6)
    for g_s, g_f in zip(grads_s, grads_f, strict=True):
        assert (g_s is None) == (g_f is None)
        assert g_s is None or torch.allclose(g_s, g_f, atol=1e-6)
    if setting == "kt":  # the details' sequences are the last 7 steps of the full ones
        for name in ("f_l", "f_v", "a_from_v", "a_from_l", "f_a_hat", "f_a"):
            assert det_s[name].shape[1] == 7 and torch.allclose(det_s[name], det_f[name][:, 5:], atol=1e-6), name


def test_leading_padding_by_hand():
    cfg = model_config("mosi", "aligned", setting="kt", d=8, heads=2, layers=1, mem_layers=1, kt_layers=1,
                       seq_lens={"l": 12, "a": 12, "v": 12})
    model = KTModel(cfg).train()
    batch = _padded_batch(cfg, LENGTHS)
    assert model.leading_padding(batch) == 5
    # an evaluation pass of kt reads language and vision only: the audio decides nothing (and is not read)
    model.eval()
    no_audio = {k: v for k, v in batch.items() if k not in ("a", "mask_a")}
    assert model.leading_padding(no_audio) == 5
    with torch.no_grad():
        assert torch.allclose(model(no_audio, skip_padding=True), model(no_audio), atol=1e-6)
    model.train()
    # a vision kernel of 3 reads one step left of the cut: a non-zero input there keeps every step
    assert cfg.kernels["v"] == 3
    batch["v"][0, 4] = 1.0
    assert model.leading_padding(batch) == 0
    # every step padding: the last one is kept
    empty = _padded_batch(cfg, {m: [0, 0] for m in "lav"})
    assert model.leading_padding(empty) == 11
    # delta over the two halves along time: the second half's position codes would move, so nothing is left out
    timed = KTModel(model_config("mosi", "aligned", setting="kt", d=8, heads=2, layers=1, mem_layers=1,
                                 kt_layers=1, seq_lens={"l": 12, "a": 12, "v": 12}, kt_concat="time")).train()
    assert timed.leading_padding(_padded_batch(cfg, LENGTHS)) == 0


def test_position_codes_after_a_cut_are_the_kept_steps_own():
    pos = SinusoidalPositions(6)
    whole = pos(10)
    pos.skipped = 4
    assert torch.equal(pos(6), whole[4:])
    pos.skipped = 0
    assert torch.equal(pos(10), whole)
