"""Attention plumbing beside the model: masks, the CPU fast paths of attention and a cheaper dropout.

Nothing here changes what :mod:`ktlib.model` computes, only how fast it runs (every path gives the same function
up to float rounding; ``tests/test_fast_paths.py`` checks them against the plain formulas):

- masks: :func:`causal_mask` (MulT's future mask, stretched to unequal lengths), its per-sample form on real
  frames :func:`causal_mask_from_padding`, :func:`span_mask_from_padding` and :func:`pool_onto` (the word-slot
  time axis of unaligned ``kt``), and :class:`AttentionMask`, which combines them once per stack of layers;
- :func:`attend`: ``softmax(q k^T / sqrt(d_k)) v`` through PyTorch's fused kernel, on the CPU through the
  compiled kernel of :mod:`ktlib.kernels` (when it is built) or :class:`ExplicitAttention` for small score
  matrices and dropout on the weights, or the plain formula when the weights are asked for;
  :func:`causal_real_first`: long causal self-attention with each sample's real frames moved to the front;
- :func:`dropout` / :class:`Dropout`: ``F.dropout``'s semantics with cheaper random numbers on the CPU (the
  compiled kernel's, when it is built).

Mask vocabulary: see :mod:`ktlib.model` (``pad`` True on padding frames, ``blocked`` True where a query may not
see a key).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ktlib import kernels


def causal_mask(t: int, s: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i may not see key j: key j ends later (in relative time) than query i.

    For T == S this is the usual future mask; for T != S the diagonal is stretched to the source's length, so the
    last query sees every key.
    """
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return (j + 1) * t > (i + 1) * s  # (j+1)/S > (i+1)/T without rounding


def causal_mask_from_padding(query_pad: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
    """(B, T, S) bool, True where a real query step may not see a key: the key lies later in the utterance.

    For front-padded sequences (real frames at the end) every sample's real frames span the same utterance, so
    query i of n_t real steps sees key j of n_s real steps when ``(j + 1) / n_s <= (i + 1) / n_t``.  This is
    :func:`causal_mask` applied to each sample's real frames: unaligned streams of different lengths and padding
    stay in step.  Padding queries get no causal constraint (their output is padding).
    """
    t, s = query_pad.shape[1], key_pad.shape[1]
    n_t = (~query_pad).sum(1, keepdim=True)  # (B, 1) real query steps
    n_s = (~key_pad).sum(1, keepdim=True)  # (B, 1) real keys
    p_t = torch.arange(t, device=query_pad.device)[None, :] - (t - n_t)  # (B, T) index among real steps; < 0 padding
    p_s = torch.arange(s, device=key_pad.device)[None, :] - (s - n_s)  # (B, S)
    later = (p_s[:, None, :] + 1) * n_t[:, :, None] > (p_t[:, :, None] + 1) * n_s[:, :, None]  # (B, T, S)
    return later & (p_t >= 0)[:, :, None]


def _real_positions(pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a front-padded (B, T) padding mask: each step's index among the real steps (< 0 on padding), (B, T),
    and the number of real steps (B, 1)."""
    n = (~pad).sum(1, keepdim=True)
    return torch.arange(pad.shape[1], device=pad.device)[None, :] - (pad.shape[1] - n), n


def span_mask_from_padding(query_pad: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
    """(B, T, S) bool, True where a real query step may not see a key: their spans of the utterance do not overlap.

    Query i of n_t real steps covers ``[i / n_t, (i + 1) / n_t)`` of the utterance, key j of n_s real steps
    ``[j / n_s, (j + 1) / n_s)``.  A query on the word axis then reads exactly the frames said during its word.
    Padding queries get no constraint (their output is padding).
    """
    p_t, n_t = _real_positions(query_pad)
    p_s, n_s = _real_positions(key_pad)
    overlap = ((p_s[:, None, :] * n_t[:, :, None] < (p_t[:, :, None] + 1) * n_s[:, :, None])
               & ((p_s[:, None, :] + 1) * n_t[:, :, None] > p_t[:, :, None] * n_s[:, :, None]))  # (B, T, S)
    return ~overlap & (p_t >= 0)[:, :, None]


def pool_onto(values: torch.Tensor, value_pad: torch.Tensor, anchor_pad: torch.Tensor):
    """Average a front-padded sequence over the spans of another axis: (B, S, d) -> (B, T, d), and (B, T) bool real.

    Real step j of n_s (its centre at ``(j + 0.5) / n_s`` of the utterance) goes to the anchor step whose span holds
    that centre; each anchor step gets the mean of its steps (real where it has at least one).  This is how
    word-aligned files are made from frame-level features.
    """
    p_t, n_t = _real_positions(anchor_pad)
    p_s, n_s = _real_positions(value_pad)
    slot = torch.div((2 * p_s + 1) * n_t, 2 * n_s.clamp_min(1), rounding_mode="floor")  # (B, S) anchor step
    slot = torch.where(p_s >= 0, slot, torch.full_like(slot, -1))
    match = ((slot[:, None, :] == p_t[:, :, None]) & (p_t >= 0)[:, :, None]).to(values.dtype)  # (B, T, S)
    count = match.sum(-1, keepdim=True)  # (B, T, 1)
    return (match @ values) / count.clamp_min(1), count[..., 0] > 0


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout``'s semantics (zero each element with probability p, scale the others by 1 / (1 - p)), with
    cheaper random numbers on the CPU.

    On the CPU, ``F.dropout`` draws one double per element (``bernoulli_``) and was the largest single cost of a
    training step.  Here one 64-bit draw of torch's generator gives four 16-bit integers u, and an element is
    dropped when u falls in the lowest ``round(p * 2**16)`` of the 2**16 values: p is rounded to a multiple of
    2**-16 (0.1 -> 0.100006).  Same seed, same mask; the random stream differs from ``F.dropout``'s.  Elsewhere
    (CUDA), ``F.dropout``'s fused kernel is used as it is.  Where the compiled kernels are built
    (:mod:`ktlib.kernels`), a float32 CPU tensor goes through :func:`ktlib.kernels.dropout` instead: the same rate,
    random numbers from a hash of (two keys from torch's generator, element index).
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    if kernels.dropout_fits(x):  # the same rate from a counter-based hash, mask recomputed for the backward pass
        return kernels.dropout(x, p)
    return x * dropout_mask(x.shape, p).to(x.dtype)


def dropout_mask(shape, p: float) -> torch.Tensor:
    """A CPU float mask for :func:`dropout`: 0 with probability p (to 2**-16), else 1 / (1 - p); shape ``shape``."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # every 64-bit value equally likely
    u = bits.view(torch.int16)[:n].view(shape).float()  # integers in [-2**15, 2**15), exact in float32
    cut = round(p * 2**16) - 2**15  # dropped: u < cut
    # float arithmetic instead of a comparison (vectorised, no bool -> float cast): u - cut + 1 is >= 1 where kept,
    # <= 0 where dropped, so the clamp gives 1 or 0
    return u.sub_(cut - 1).clamp_(0.0, 1.0).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (the same rate at the same place; cheaper random numbers on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class AttentionMask:
    """Which keys each query may not see, built once per stack of layers and shared by them.

    ``blocked`` (1|B, 1|H, T|1, S) bool, True where attention is not allowed: ``key_padding_mask`` (B, S) and
    ``attn_mask`` (T, S) or (B, T, S) together.  ``empty`` (1|B, 1|H, T|1, 1): queries that may see no key; their
    rows attend over every key (no NaN) and their result is zeroed.  ``bias(dtype)``: the same as an additive
    mask (0 or -inf, empty rows open), what the fused kernel reads; made once per dtype (the kernel would otherwise
    turn a bool mask into it in every layer).  ``chunks``: optional row ranges [a, b) whose queries see no key
    from b on, so that the fused kernel can leave those keys out, and ``n_real`` (B, 1): sample i's rows from
    ``n_real[i]`` on see no key, so a chunk leaves out the samples none of whose rows see one
    (:meth:`causal_real_first`).
    """

    def __init__(self, blocked: torch.Tensor, chunks: tuple[tuple[int, int], ...] = (),
                 n_real: torch.Tensor | None = None):
        self.blocked, self.chunks, self.n_real = blocked, chunks, n_real
        self._bias: dict[torch.dtype, torch.Tensor] = {}

    @functools.cached_property
    def empty(self) -> torch.Tensor:  # made when first asked: the compiled kernel's real-first path never asks
        return self.blocked.all(-1, keepdim=True)

    @functools.cached_property
    def has_empty(self) -> bool:
        # whether any row is empty: asked once on the CPU (no device sync there), so that layers skip the zeroing
        return self.blocked.device.type != "cpu" or bool(self.empty.any())

    @classmethod
    def build(cls, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None) -> AttentionMask | None:
        blocked = None
        if key_padding_mask is not None:
            blocked = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if attn_mask is not None:
            am = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None]  # (1|B, 1, T, S)
            blocked = am if blocked is None else blocked | am
        return None if blocked is None else cls(blocked)

    @classmethod
    def causal_real_first(cls, n_real: torch.Tensor, t: int, chunk: int) -> AttentionMask:
        """Causal self-attention over sequences whose ``n_real`` (B, 1) real frames come first, padding after: a
        real row i sees key j when j <= i (so every key it sees is real); a padding row sees none (zero result).
        Row i sees no key after itself, so rows [a, b) need keys [0, b) only, and only the samples with a real row
        in [a, b)."""
        i = torch.arange(t, device=n_real.device)
        blocked = (i[None, :] > i[:, None]) | (i >= n_real)[:, :, None]  # (B, T, T)
        return cls(blocked[:, None], tuple((a, min(a + chunk, t)) for a in range(0, t, chunk)), n_real)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bias:
            shut = self.blocked & ~self.empty
            self._bias[dtype] = torch.zeros(shut.shape, dtype=dtype, device=shut.device).masked_fill_(
                shut, float("-inf"))
        return self._bias[dtype]


class ExplicitAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + bias) * drop_scale @ v`` and its gradient, for the CPU; ``drop_scale``: dropout's
    mask (0 or 1 / (1 - p)) or None.

    Each batched product is written so that d_k (4 or 8 in the paper's configurations) is the row count of its
    result, not its column count, e.g. ``out^T = v^T weights^T``: MKL is several times slower on results only d_k
    columns wide, and autograd's backward of the plain formula makes three of them.

    Forward and backward run over blocks of samples (:func:`_sample_blocks`), so that the score-sized
    temporaries of a block (scores, their gradient, the softmax's) stay in the CPU's cache between the several
    passes over them instead of going to memory and back each time; only the weights and the dropped weights, kept
    for the backward pass, are written out whole.  Every sample's arithmetic is the same as without blocks.  The
    backward pass goes through dropout and softmax in two passes over the scores: ``u - w * sum(u)`` with ``u`` the
    gradient of the dropped weights times the dropped weights.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, drop_scale, scale: float):
        b, heads, t, d_k = q.shape
        blocks = _sample_blocks(b, heads * t * k.shape[2])
        weights = None if len(blocks) == 1 else q.new_empty(b, heads, t, k.shape[2])  # (B, H, T, S), for backward
        dropped = None if drop_scale is None or len(blocks) == 1 else torch.empty_like(drop_scale)  # likewise
        out_t = q.new_empty(b, heads, d_k, t)
        for rows in blocks:
            scores = (q[rows] * scale) @ k[rows].transpose(-2, -1)  # (b', H, T, S)
            if bias is not None:
                scores += _rows_of(bias, rows)
            if weights is None:  # one block: the softmax's result is the whole weights tensor
                weights = scores.softmax(-1)
            else:
                weights[rows] = scores.softmax(-1)
            if drop_scale is None:
                dropped_w = weights[rows]
            elif dropped is None:  # one block: the product is the whole dropped weights tensor
                dropped = dropped_w = weights * drop_scale
            else:
                dropped_w = torch.mul(weights[rows], drop_scale[rows], out=dropped[rows])
            torch.matmul(v[rows].transpose(-2, -1), dropped_w.transpose(-2, -1), out=out_t[rows])  # (d_k,S)@(S,T)
        # the dropped weights, not the mask: the backward pass need not multiply them again
        ctx.save_for_backward(q, k, v, weights, weights if drop_scale is None else dropped)
        ctx.scale = scale
        return out_t.transpose(-2, -1)  # (B, H, T, d_k)

    @staticmethod
    def backward(ctx, grad):  # grad (B, H, T, d_k)
        q, k, v, weights, dropped = ctx.saved_tensors
        grad_q, grad_k, grad_v = (torch.empty_like(x) for x in (q, k, v))
        for rows in _sample_blocks(weights.shape[0], weights[0].numel()):
            w, dropped_w, g = weights[rows], dropped[rows], grad[rows]
            grad_v[rows] = (g.transpose(-2, -1) @ dropped_w).transpose(-2, -1)  # (d_k, T) @ (T, S)
            # through the dropout and the softmax: the gradient of the scores is w * (grad_w - sum(grad_w * w)) with
            # grad_w = (g v^T) * drop_scale, i.e. u - w * sum(u) with u = (g v^T) * dropped_w: two passes, not five
            grad_s = (g @ v[rows].transpose(-2, -1)).mul_(dropped_w)  # (b', H, T, S)
            grad_s.addcmul_(w, grad_s.sum(-1, keepdim=True), value=-1.0)
            grad_q[rows] = (k[rows].transpose(-2, -1) @ grad_s.transpose(-2, -1)).transpose(-2, -1) * ctx.scale
            grad_k[rows] = (q[rows].transpose(-2, -1) @ grad_s).transpose(-2, -1) * ctx.scale  # (d_k, T) @ (T, S)
        return grad_q, grad_k, grad_v, None, None, None


# Elements of a block's score tensor in ExplicitAttention: 1M floats (4 MB).  Measured on this project's 2-core
# machine (fwd + bwd, 2 threads): 24 samples x 10 heads x 500 x 50 (paper MOSI, unaligned, vision queries) 38 ms
# unblocked, 21 ms in blocks of 4 samples; 50 x 500 29 -> 21 ms; score tensors of 1M floats or fewer (every aligned
# shape here) stay one block: smaller blocks made them slower (2.6 -> 3.0 ms at 24 x 10 x 50 x 50 in 2 blocks)
BLOCK_SCORES = 1024 * 1024


def _sample_blocks(b: int, per_sample: int) -> list[slice]:
    """Slices of a batch of ``b`` samples with ``per_sample`` score elements each: blocks of up to
    ``BLOCK_SCORES`` elements (at least one sample each)."""
    step = max(1, BLOCK_SCORES // max(per_sample, 1))
    return [slice(a, min(a + step, b)) for a in range(0, b, step)]


def _rows_of(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """The block ``rows`` of a mask or bias that is per sample (B, ...) or shared by all (1, ...)."""
    return mask if mask.shape[0] == 1 else mask[rows]


# Score matrices (T x S per head) up to this size skip the fused kernel on the CPU: measured on 2 cores with
# d_k = 4, ExplicitAttention is 2x faster at 50 x 50, 1.3x at 500 x 50, as fast at 50 x 500, 2.7x slower at 500 x 500
SMALL_ATTENTION = 32 * 1024
CAUSAL_CHUNK = 128  # query rows per fused call in long causal self-attention (causal_real_first)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None, p: float,
           drop_keys: bool = False, need_weights: bool = False, reference: bool = False):
    """``softmax(q k^T / sqrt(d_k)) v`` per head, (B, H, T, d_k) from q (B, H, T, d_k), k and v (B, H, S, d_k).

    ``mask``: the keys each query may not see; a query that may see none gets a zero result.  ``p``: dropout on
    the attention weights (0 outside training); with ``drop_keys`` whole keys are dropped per sample and head
    before the softmax instead (far fewer random numbers).  Returns ``(out, weights)``, the weights (B, H, T, S)
    only when ``need_weights`` (else None).  The plain formula when the weights are asked for or ``reference``;
    else PyTorch's fused kernel, except on the CPU: there the compiled kernel (:func:`ktlib.kernels.attention`)
    serves every shape when it is built, else :class:`ExplicitAttention` serves dropout on the weights (the fused
    kernel has none there) and small score matrices.
    """
    b, heads, t, d_k = q.shape
    s = k.shape[2]
    if p > 0 and drop_keys:  # drop whole keys per sample and head: (B, H, 1, S) draws
        dropped = torch.rand(b, heads, 1, s, device=q.device) < p
        mask = AttentionMask(dropped if mask is None else mask.blocked | dropped)
        p = 0.0
    # on the CPU, the compiled kernel: one pass per head each way, the dropout mask recomputed; 1.4-4x PyTorch's
    # paths on every shape here (docs/benchmark.md).  Real frames first (causal_real_first): it needs no bias and
    # never computes the keys after a row
    compiled = not (need_weights or reference) and q.device.type == "cpu" and kernels.attention_fits(q, k, v)
    real_first = compiled and mask is not None and mask.n_real is not None  # rows past the real frames: zeros
    bias = None if mask is None or real_first else mask.bias(q.dtype)  # (1|B, 1|H, T|1, S) 0 or -inf
    weights = None
    if need_weights or reference:  # the formula as written, keeping the weights
        scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (B, H, T, S)
        weights = scores.softmax(-1) if bias is None else (scores + bias).softmax(-1)
        out = dropout(weights, p) @ v  # (B, H, T, d_k)
        if need_weights and mask is not None:
            weights = weights.masked_fill(mask.empty, 0.0)
    elif compiled:
        out = kernels.attention(q, k, v, bias, p, d_k ** -0.5, n_real=mask.n_real if real_first else None)
    elif q.device.type == "cpu" and (p > 0 or t * s <= SMALL_ATTENTION):
        # On the CPU the fused kernel has no dropout (with p > 0 it falls back to a plain path with F.dropout),
        # and on small score matrices its per-block overhead costs more than explicit products
        drop_scale = dropout_mask((b, heads, t, s), p).to(q.dtype) if p > 0 else None
        out = ExplicitAttention.apply(q, k, v, bias, drop_scale, d_k ** -0.5)  # (B, H, T, d_k)
    elif mask is not None and len(mask.chunks) > 1:  # rows [a, b) see no key from b on: leave those out
        out = torch.cat([_causal_chunk(q, k, v, bias, mask.n_real, a, b, p) for a, b in mask.chunks], dim=2)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, d_k)
    if mask is not None and not real_first and mask.has_empty:
        out = out.masked_fill(mask.empty, 0.0)
    return out, (weights if need_weights else None)


def _causal_chunk(q, k, v, bias, n_real, a: int, b: int, p: float) -> torch.Tensor:
    """Rows [a, b) of :func:`attend` under :meth:`AttentionMask.causal_real_first`: keys [0, b) only, and only
    the samples with a real row from a on; the others' rows see no key and get zeros.  (B, H, b - a, d_k)."""
    live = (n_real[:, 0] > a).nonzero()[:, 0]  # samples with a real row in [a, b)
    if live.numel() == q.shape[0]:
        return F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], attn_mask=bias[..., a:b, :b],
                                              dropout_p=p)
    out = q.new_zeros(q.shape[0], q.shape[1], b - a, q.shape[3])
    if live.numel() == 0:
        return out
    rows = F.scaled_dot_product_attention(q[live, :, a:b], k[live, :, :b], v[live, :, :b],
                                          attn_mask=bias[..., a:b, :b][live], dropout_p=p)
    return out.index_copy(0, live, rows)


def real_first_pays(x: torch.Tensor, pad: torch.Tensor | None) -> bool:
    """Whether :func:`causal_real_first` should serve a causal self-attention stack: long sequences on the CPU."""
    return pad is not None and x.shape[1] >= 2 * CAUSAL_CHUNK and x.device.type == "cpu"


def causal_real_first(layers: nn.ModuleList, norm: nn.Module, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """A causal self-attention stack (``layers`` then ``norm``) on long front-padded sequences (CPU), computed with
    each sample's real frames moved to the front: the same result (every layer but attention acts on each step
    alone, and the attention sees the same keys), but each block of query rows then needs only the keys before its
    end, so the fused kernel skips about a third of the score matrix (:meth:`AttentionMask.causal_real_first`)."""
    t = x.shape[1]
    n_real = (~pad).sum(1, keepdim=True)  # (B, 1)
    steps = torch.arange(t, device=x.device)[None, :]
    to_front = ((steps + t - n_real) % t)[..., None].expand_as(x)  # (B, T, d): real frames first, then padding
    back = ((steps + n_real) % t)[..., None].expand_as(x)  # its inverse
    mask = AttentionMask.causal_real_first(n_real, t, CAUSAL_CHUNK)
    x = x.gather(1, to_front)
    for layer in layers:
        x = layer(x, None, mask)[0]
    return norm(x.gather(1, back))
