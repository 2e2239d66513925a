"""The compiled CPU kernels (ktlib.kernels) compute what the PyTorch paths compute: attention and its gradient
against ExplicitAttention (any strides, every mask layout, head sizes 4, 8 and another), dropout of the weights
with the kernel's own mask, causal self-attention over real frames first, dropout's rate, scale and gradient, the
same bits whatever the thread count, clear errors for shapes that do not fit, the PyTorch paths (with the reason)
when the kernels are off or cannot be built, a damaged cached library built again, and workers that start together
building it once.

No test here times anything: speed is measured by ``python -m ktlib.bench``, never asserted.
"""

import math
import os

import pytest
import torch

import ktlib.layers as layers_module
from ktlib import kernels
from ktlib.layers import ExplicitAttention, dropout_mask

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels {kernels.status()}")


def _inputs(b, h, t, s, dk, bias_kind, seed=0):
    """q, k, v as the model makes them (heads split off a (B, T, H * d_k) projection: strided views), a bias."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, dk, generator=g).transpose(1, 2) for n in (t, s, s))
    blocked = {
        "none": None,
        "keys": torch.rand(b, 1, 1, s, generator=g) < 0.4,  # key padding, per sample
        "rows": torch.rand(b, 1, t, s, generator=g) < 0.4,  # per sample and query
        "shared": torch.rand(1, 1, t, s, generator=g) < 0.4,  # one (T, S) mask for every sample
    }[bias_kind]
    if blocked is None:
        return q, k, v, None
    blocked[..., -1] = False  # every query sees a key (AttentionMask opens the rows that would see none)
    return q, k, v, torch.zeros(blocked.shape).masked_fill(blocked, float("-inf"))


def _run(fn, q, k, v, grad):
    """Output and the gradients of q, k, v of ``fn(q, k, v)`` for upstream gradient ``grad``."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("shape", [(3, 2, 7, 5, 4), (2, 3, 6, 13, 8), (2, 2, 4, 9, 5), (1, 1, 1, 1, 4),
                                   (2, 2, 50, 50, 4)])
@pytest.mark.parametrize("bias_kind", ["none", "keys", "rows", "shared"])
def test_attention_kernel_equals_explicit_attention_and_its_gradient(shape, bias_kind):
    b, h, t, s, dk = shape
    q, k, v, bias = _inputs(b, h, t, s, dk, bias_kind)
    grad = torch.randn(b, h, t, dk)
    assert kernels.attention_fits(q, k, v)
    got = _run(lambda q, k, v: kernels.attention(q, k, v, bias, 0.0, dk ** -0.5), q, k, v, grad)
    want = _run(lambda q, k, v: ExplicitAttention.apply(q, k, v, bias, None, dk ** -0.5), q, k, v, grad)
    for name, a, w in zip(("out", "grad q", "grad k", "grad v"), got, want, strict=True):
        assert a.shape == w.shape
        assert torch.allclose(a, w, atol=2e-6, rtol=1e-5), (name, (a - w).abs().max().item())


def test_attention_kernel_with_dropout_is_the_explicit_formula_with_its_own_mask():
    """The mask the attention kernel draws is dropout_apply's on a (B, H, T, S) tensor with the same keys: the
    kernel equals ExplicitAttention given that mask, forward and backward."""
    b, h, t, s, dk, p = 3, 2, 6, 11, 4, 0.3
    q, k, v, bias = _inputs(b, h, t, s, dk, "rows")
    grad = torch.randn(b, h, t, dk)
    torch.manual_seed(7)
    mask = kernels.dropout(torch.ones(b, h, t, s), p)
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    torch.manual_seed(7)  # the same keys for the attention call
    got = _run(lambda q, k, v: kernels.attention(q, k, v, bias, p, dk ** -0.5), q, k, v, grad)
    want = _run(lambda q, k, v: ExplicitAttention.apply(q, k, v, bias, mask, dk ** -0.5), q, k, v, grad)
    for a, w in zip(got, want, strict=True):
        assert torch.allclose(a, w, atol=2e-6, rtol=1e-5)
    torch.manual_seed(8)  # other keys, another mask
    other = _run(lambda q, k, v: kernels.attention(q, k, v, bias, p, dk ** -0.5), q, k, v, grad)
    assert not torch.allclose(other[0], got[0])


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_real_first_causal_attention_computes_only_the_keys_a_row_sees(p):
    """With ``n_real`` the kernel is causal self-attention over real frames first: the same as the explicit
    formula under AttentionMask.causal_real_first's bias, rows past a sample's real frames zero, and gradients
    equal, with dropout of the weights too (its mask: dropout_apply's with the same keys)."""
    b, h, t, dk = 4, 2, 21, 8
    q, k, v, _ = _inputs(b, h, t, t, dk, "none", seed=3)
    n_real = torch.tensor([[21], [1], [9], [0]])  # all real, one frame, some, none
    mask = layers_module.AttentionMask.causal_real_first(n_real, t, 8)
    grad = torch.randn(b, h, t, dk)
    torch.manual_seed(11)
    keep = kernels.dropout(torch.ones(b, h, t, t), p) if p > 0 else None
    torch.manual_seed(11)
    got = _run(lambda q, k, v: kernels.attention(q, k, v, None, p, dk ** -0.5, n_real=n_real), q, k, v, grad)
    want = _run(lambda q, k, v: ExplicitAttention.apply(q, k, v, mask.bias(torch.float32), keep, dk ** -0.5)
                .masked_fill(mask.empty, 0.0), q, k, v, grad)
    for a, w in zip(got, want, strict=True):
        assert torch.allclose(a, w, atol=2e-6, rtol=1e-5)
    assert torch.equal(got[0][1, :, 1:], torch.zeros(h, t - 1, dk)) and not got[0][3].any()
    assert torch.equal(got[1][3], torch.zeros(h, t, dk))  # no real frame: no gradient
    with pytest.raises(ValueError, match="causal self-attention"):
        kernels.attention(q, k, v, mask.bias(torch.float32), p, dk ** -0.5, n_real=n_real)


def test_attention_kernel_refuses_shapes_it_would_read_out_of_bounds():
    q, k, v, bias = _inputs(2, 3, 5, 7, 4, "rows")
    with pytest.raises(ValueError, match=r"bias \(2, 1, 5, 7\) does not broadcast to the scores \(2, 3, 6, 7\)"):
        kernels.attention(torch.cat([q, q[:, :, :1]], 2), k, v, bias, 0.0, 0.5)  # one more query than the bias
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.attention(q, k, v, bias[..., :6], 0.0, 0.5)  # a key short
    with pytest.raises(ValueError, match="do not match"):
        kernels.attention(q, k, v[:, :, :6], None, 0.0, 0.5)  # values for fewer keys than keys
    with pytest.raises(ValueError, match="do not match"):
        kernels.attention(q[..., :3], k, v, None, 0.0, 0.5)  # another head size
    with pytest.raises(ValueError, match="expected float32 on the CPU"):
        kernels.attention(q, k, v, bias.double(), 0.0, 0.5)  # the kernel reads float32


def test_kernels_give_the_same_bits_with_one_thread_and_two():
    q, k, v, bias = _inputs(4, 2, 9, 12, 8, "keys")
    grad = torch.randn(4, 2, 9, 8)
    x = torch.randn(300, 700)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            att = _run(lambda q, k, v: kernels.attention(q, k, v, bias, 0.2, 8 ** -0.5), q, k, v, grad)
            results.append(att + [kernels.dropout(x, 0.1)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_dropout_kernel_rate_scale_and_gradient(p):
    torch.manual_seed(0)
    n = 1_000_000
    x = torch.randn(1000, n // 1000).requires_grad_()
    y = kernels.dropout(x, p)
    kept = y != 0
    dropped = 1.0 - kept.double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n) + 2**-16  # binomial (5 sd) plus p's rounding
    scale = torch.tensor(1.0 / (1.0 - p))  # float32, as the kernel multiplies
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * scale, torch.zeros_like(g)))  # the mask, recomputed


def test_dropout_kernel_masks_are_independent_of_position_and_between_calls():
    torch.manual_seed(1)
    ones = torch.ones(400, 500)
    first = (kernels.dropout(ones, 0.5) > 0).double()
    second = (kernels.dropout(ones, 0.5) > 0).double()

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    bound = 5 / math.sqrt(first.numel())  # 5 sd of a correlation of independent bits
    assert abs(corr(first, second)) < bound  # two calls
    assert abs(corr(first[:, 1:], first[:, :-1])) < bound  # neighbours in a row
    assert abs(corr(first[1:], first[:-1])) < bound  # neighbours in a column
    torch.manual_seed(1)
    assert torch.equal((kernels.dropout(ones, 0.5) > 0).double(), first)  # the same seed, the same mask


def test_layers_use_the_kernels_and_keep_pytorchs_paths_for_what_they_do_not_serve():
    torch.manual_seed(2)
    x = torch.randn(6, 7)
    torch.manual_seed(5)
    through_layers = layers_module.dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(through_layers, kernels.dropout(x, 0.3))
    x64 = x.double()  # float64: not the kernel's
    assert not kernels.dropout_fits(x64)
    torch.manual_seed(5)
    through_layers = layers_module.dropout(x64, 0.3)
    torch.manual_seed(5)
    assert torch.equal(through_layers, x64 * dropout_mask(x64.shape, 0.3).double())
    dk = kernels.MAX_DK + 1  # a head size over the kernel's limit: ExplicitAttention serves it
    q, k, v, _ = _inputs(2, 2, 3, 4, dk, "none")
    assert not kernels.attention_fits(q, k, v)
    out, _ = layers_module.attend(q, k, v, None, 0.0)
    assert torch.allclose(out, ExplicitAttention.apply(q, k, v, None, None, dk ** -0.5))


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """The kernels' state forgotten and their cache in a temporary folder; restored afterwards."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("KTLIB_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def test_kernels_off_leave_the_pytorch_paths(fresh_kernels, monkeypatch):
    monkeypatch.setenv("KTLIB_KERNELS", "0")
    assert not kernels.available()
    assert "KTLIB_KERNELS=0" in kernels.status()
    x = torch.randn(5, 8)
    assert not kernels.dropout_fits(x)
    torch.manual_seed(4)
    y = layers_module.dropout(x, 0.25)
    torch.manual_seed(4)
    assert torch.equal(y, x * dropout_mask(x.shape, 0.25))  # the PyTorch path's random stream


def test_a_compiler_that_fails_leaves_the_pytorch_paths_and_says_why(fresh_kernels, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken-cc 1.0 && exit 0\necho 'no such flag' >&2\n"
                      "exit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert not kernels.available()
    assert "could not build" in kernels.status() and "no such flag" in kernels.status()
    assert not list(fresh_kernels.glob("*.so"))  # no half-built file left in the cache


def test_a_damaged_library_in_the_cache_is_built_again(fresh_kernels):
    target = kernels._target(kernels._compiler(), kernels._flags())
    assert target.parent == fresh_kernels
    target.write_bytes(b"not a shared library")  # say, a copy cut short
    assert kernels.available(), kernels.status()
    assert target.read_bytes()[:4] == b"\x7fELF"


def test_workers_starting_together_build_the_library_once(fresh_kernels):
    """Two processes that find the cache empty at the same time: one builds under the lock, the other waits and
    loads the same file; both use the kernels and no temporary file is left."""
    import subprocess
    import sys

    code = "from ktlib import kernels; print(kernels.available(), kernels.status())"
    env = {**os.environ, "KTLIB_KERNEL_CACHE": str(fresh_kernels)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(out.startswith("True on (") for out in outs), outs
    assert len(list(fresh_kernels.glob("*.so"))) == 1
    assert not [f for f in fresh_kernels.iterdir() if f.suffix not in (".so", ".lock")]
