"""The paper's model: a MulT backbone with a knowledge-transfer network that reconstructs the missing audio.

Liu, Zhan, Chen, "Multimodal Sentiment Analysis with Missing Modality: A Knowledge-Transfer Approach" (arXiv
2401.10747).  Read top to bottom: the configuration and the settings, then one ``nn.Module`` per concept, each
naming the equation it implements.  The transformer blocks come first because every network below is built from
them: projection and positions (MulT), cross-modal attention and its residual block (equations 3-4), the
consistency loss (equation 1), the reconstruction theta, phi and the fusion delta (equations 1-2), the backbone
and its prediction head (equation 5), the model and its loss (equation 6).

Beside it, not in it: :mod:`ktlib.layers` (masks, the CPU fast paths of attention, a cheaper dropout),
:mod:`ktlib.model_extras` (what goes beyond the paper: ``kt_any``, the word-slot and query time axes, where the
consistency target comes from) and :mod:`ktlib.checkpoint` (files).

Vocabulary: ``l`` / ``a`` / ``v`` for language, audio, vision; ``trans_l_with_a`` is the cross-modal transformer
whose target (queries) is l and source (keys, values) is a, written ``(A) -> L``.

Masks (one name per meaning, used everywhere in ktlib)
  ``pad``      (B, T) bool, True on padding frames (a batch's ``mask_l`` / ``mask_a`` / ``mask_v``).
  ``present``  {m: (B,)} bool (a batch's ``present``, (B, 3) in l, a, v order): the sample carries modality m.
  ``allowed``  {m: (B,)} bool: the model may read m: ``present`` narrowed by a batch's optional ``allowed``
               (B, 3), with which training simulates missing modalities while the present ones still supervise
               the reconstructions.  A modality that is not allowed is never read: zeros marked as padding.
  ``frames``   (B, T) bool, True on the real frames a consistency loss compares.
  ``blocked``  (B|1, H|1, T, S) bool, True where a query may not see a key (:class:`ktlib.layers.AttentionMask`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import model_extras as extras
from .layers import (
    AttentionMask,
    Dropout,
    attend,
    causal_mask,
    causal_mask_from_padding,
    causal_real_first,
    dropout,
    real_first_pays,
)
from .specs import MODALITIES


@dataclass(frozen=True)
class Setting:
    """What one setting of the paper's tables does with each modality."""

    fuses: tuple[str, ...]  # modality slots the backbone fuses (in kt the audio slot holds f'_A)
    reconstructs: tuple[str, ...]  # targets the knowledge-transfer network rebuilds from the other two
    reads_at_test: tuple[str, ...]  # modalities a test batch may carry; the others are never read
    in_paper: bool = True  # a row of Tables I-III (else beyond the paper)

    @property
    def absent_at_test(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m not in self.reads_at_test)

    @property
    def absent_in_training(self) -> tuple[str, ...]:
        """Modalities a training batch leaves out: those the model neither fuses nor reconstructs."""
        return tuple(m for m in MODALITIES if m not in self.fuses and m not in self.reconstructs)


SETTING_TABLE: dict[str, Setting] = {
    "full": Setting(fuses=MODALITIES, reconstructs=(), reads_at_test=MODALITIES),  # real audio at train and test
    "vision_only": Setting(fuses=("v",), reconstructs=(), reads_at_test=("v",)),
    "language_only": Setting(fuses=("l",), reconstructs=(), reads_at_test=("l",)),
    "language_vision": Setting(fuses=("l", "v"), reconstructs=(), reads_at_test=("l", "v")),
    "kt": Setting(fuses=MODALITIES, reconstructs=("a",), reads_at_test=("l", "v")),  # audio: a training target
    # beyond the paper: any modality rebuilt from the others (ktlib.model_extras); the audio alone
    "kt_any": Setting(fuses=MODALITIES, reconstructs=MODALITIES, reads_at_test=MODALITIES, in_paper=False),
    "audio_only": Setting(fuses=("a",), reconstructs=(), reads_at_test=("a",), in_paper=False),
}
SETTINGS = tuple(name for name, s in SETTING_TABLE.items() if s.in_paper)  # the five settings of Tables I-III
KT_SOURCES = {"a": ("v", "l"), "v": ("l", "a"), "l": ("v", "a")}  # target -> (theta's source, phi's source)


def per_modality(l, a, v) -> dict[str, int | float]:
    return {"l": l, "a": a, "v": v}


@dataclass
class ModelConfig:
    """Every number the model needs.  Defaults: the paper's MOSI configuration (Table 5), word-aligned MOSI shapes.

    For a dataset's shapes and the paper's configuration of that dataset: :func:`ktlib.config.model_config`.
    """

    # data
    feature_dims: dict[str, int] = field(default_factory=lambda: per_modality(300, 5, 20))  # input widths
    seq_lens: dict[str, int] = field(default_factory=lambda: per_modality(50, 50, 50))  # padded lengths
    task: str = "regression"  # regression: (B, 1) output; classification: IEMOCAP (B, 4, 2) logits
    # setting
    setting: str = "kt"  # a key of SETTING_TABLE: full | vision_only | language_only | language_vision | kt | ...
    targets: tuple[str, ...] = ("l", "a", "v")  # Table IV: target modalities whose cross-modal branch is kept
    # backbone (MulT)
    d: int = 40  # model width of every modality stream
    heads: int = 10  # attention heads (d divisible by heads)
    layers: int = 4  # depth of each cross-modal transformer
    mem_layers: int | None = None  # depth of each target's self-attention memory (None: MulT's max(layers, 3))
    kernels: dict[str, int] = field(default_factory=lambda: per_modality(1, 3, 3))  # Conv1d kernel per modality
    causal: bool = True  # MulT's future mask (stretched to the source's length in cross-modal blocks)
    text_dropout: float = 0.2  # dropout on the language input features ("text-embedding dropout")
    embed_dropout: float = 0.2  # dropout after scaling + positions inside every transformer ("block dropout")
    attn_dropout: dict[str, float] = field(default_factory=lambda: per_modality(0.1, 0.0, 0.0))  # per target
    relu_dropout: float = 0.1  # inside the feed-forward sublayer
    res_dropout: float = 0.1  # on each sublayer's output before the residual sum
    out_dropout: float = 0.1  # inside the residual MLP head
    attn_impl: str = "fused"  # fused: the fast paths of ktlib.layers.attend | reference: explicit softmax(QK^T)V
    attn_dropout_on: str = "weights"  # weights: zero attention weights after the softmax (MulT) | keys: drop whole
    #                                    keys per sample and head before the softmax (far fewer random numbers)
    # knowledge transfer (settings kt, kt_any)
    kt_encoder_layers: int = 1  # depth of the modality encoders giving f_L, f_V, f_A
    kt_layers: int = 3  # depth of theta, phi and delta (the paper: transformer blocks of 3 layers)
    kt_time_axis: str = "auto"  # auto | source | language | queries: f'_A's time axis (ktlib.model_extras)
    kt_concat: str = "feature"  # delta's concatenation of [theta(f_V) || phi(f_L)]: feature (2d wide) | time (2T)
    kt_target: str = "random"  # random | trained | run | run_memory: where the target f_A comes from (model_extras)
    kt_target_shuffle: bool = False  # placebo: in training, each sample's f_A comes from another sample's audio
    kt_hat_weight: float = 0.0  # lambda3 (beyond the paper's loss): weight of l_c(f'_A, f_A), on delta's output
    consistency: str = "l2"  # l2 (mean squared error, the paper's default) | l1 (Table V)
    lambda1: float = 1.0  # weight of l_c(theta(f_V), f_A) in the loss (KTModel.paper_loss)
    lambda2: float = 1.0  # weight of l_c(phi(f_L), f_A) in the loss (KTModel.paper_loss)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.mem_layers is None:
            self.mem_layers = max(self.layers, 3)
        extras.validate_config(self)

    @property
    def target_from_run(self) -> bool:
        """Whether kt's consistency target is read from a finished run (``kt_target`` run or run_memory)."""
        return self.setting == "kt" and self.kt_target in ("run", "run_memory")

    @property
    def inputs(self) -> tuple[str, ...]:
        return SETTING_TABLE[self.setting].fuses

    @property
    def kept_targets(self) -> tuple[str, ...]:
        """Targets of the backbone: the configured ones that this setting has (all its inputs if none match)."""
        kept = tuple(m for m in MODALITIES if m in self.targets and m in self.inputs)
        return kept or self.inputs

    @property
    def output_dim(self) -> int:
        return 8 if self.task == "classification" else 1

    @property
    def time_axis(self) -> str:
        if self.kt_time_axis != "auto":
            return self.kt_time_axis
        if len(set(self.seq_lens.values())) == 1:
            return "source"
        return "queries" if self.setting == "kt_any" else "language"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


# ----------------------------------------------------------------------------------------------------------------
# Inputs (MulT): a temporal projection to the model width, sinusoidal positions


class ModalityProjection(nn.Module):
    """Temporal Conv1d from a modality's feature width to d: (B, T, D_m) -> (B, T, d)."""

    def __init__(self, in_dim: int, d: int, kernel: int):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"Conv1d kernel must be a positive odd number (keeps the length), got {kernel}")
        self.conv = nn.Conv1d(in_dim, d, kernel_size=kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: a transposed view would make every later LayerNorm and Linear of the stream copy it first
        return self.conv(x.transpose(1, 2)).transpose(1, 2).contiguous()  # (B, D, T) -> (B, d, T) -> (B, T, d)


class SinusoidalPositions(nn.Module):
    """Fixed position codes: sin on even and cos on odd channels at geometric frequencies, (T,) -> (T, d).

    ``skipped``: leading steps the sequences were cut by (:meth:`KTModel.forward` leaves out steps that are padding
    everywhere); the codes then start at that position, so every kept step keeps its own code.  The codes are
    computed once per (length, start, device, dtype) and reused (a plain cache, not a buffer: checkpoints hold no
    position codes).
    """

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.skipped = 0
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, length: int, device=None, dtype=torch.float32) -> torch.Tensor:
        key = (length, self.skipped, torch.device(device or "cpu"), dtype)
        if key not in self._cache:
            self._cache[key] = self._codes(self.skipped + length, device)[self.skipped:].to(dtype)
        return self._cache[key]  # (T, d)

    def _codes(self, length: int, device=None) -> torch.Tensor:
        pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (T, 1)
        freq = torch.exp(torch.arange(0, self.d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / self.d))
        codes = torch.zeros(length, self.d, device=device)
        codes[:, 0::2] = torch.sin(pos * freq)
        codes[:, 1::2] = torch.cos(pos * freq[: self.d // 2])
        return codes  # (T, d)


# ----------------------------------------------------------------------------------------------------------------
# Cross-modal attention and the transformer block (the building blocks of every network below)


class CrossModalAttention(nn.Module):
    """Eq. 3: ``CM_{m -> m'} = softmax(Q K^T / sqrt(d_k)) V`` with ``Q = X_{m'} W_Q``, ``K = X_m W_K``, ``V = X_m W_V``.

    Multi-head; parameters laid out as ``torch.nn.MultiheadAttention`` (``in_proj_weight`` (3d, d), ``out_proj``),
    so the two can share weights.  The product itself is :func:`ktlib.layers.attend` (the formula, or a faster
    path computing the same function).  Masks: ``key_padding_mask`` (B, S) and ``attn_mask`` (T, S) or
    (B, T, S), True where attention is not allowed (PyTorch's boolean convention), or both already combined in an
    :class:`~ktlib.layers.AttentionMask` (``mask``).  A query that may see no key at all (its source is absent or
    entirely in its future) gets a zero result, so the residual of :class:`TransformerLayer` leaves it as it was.
    """

    def __init__(self, d: int, heads: int, dropout: float = 0.0, impl: str = "fused", dropout_on: str = "weights"):
        super().__init__()
        self.d, self.heads, self.dropout = d, heads, dropout
        self.impl, self.dropout_on = impl, dropout_on
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, source: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, need_weights: bool = False, mask: AttentionMask | None = None):
        b, t, d = query.shape
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        q = F.linear(query, w_q, b_q)  # (B, T, d)
        k, v = F.linear(source, w_kv, b_kv).chunk(2, dim=-1)  # (B, S, d) each
        q, k, v = (x.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for x in (q, k, v))  # (B, H, *, d_k)
        if mask is None:
            mask = AttentionMask.build(key_padding_mask, attn_mask)
        p = self.dropout if self.training else 0.0
        out, weights = attend(q, k, v, mask, p, drop_keys=self.dropout_on == "keys", need_weights=need_weights,
                              reference=self.impl == "reference")  # (B, H, T, d_k)
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, T, d)
        return self.out_proj(out), weights


class TransformerLayer(nn.Module):
    """Eq. 4 as a pre-LayerNorm block: ``m' = m' + Z``, ``Z = CM(LN(m'), LN(m))``, then ``m' = m' + FFN(LN(m'))``."""

    def __init__(self, d: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float,
                 attn_impl: str = "fused", attn_dropout_on: str = "weights"):
        super().__init__()
        self.attn = CrossModalAttention(d, heads, attn_dropout, attn_impl, attn_dropout_on)
        self.norm_attn = nn.LayerNorm(d)  # shared by target and source, as in MulT
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), Dropout(relu_dropout), nn.Linear(4 * d, d))
        self.res_dropout = Dropout(res_dropout)

    def forward(self, x, source=None, mask: AttentionMask | None = None, need_weights=False):
        h = self.norm_attn(x)
        kv = h if source is None else self.norm_attn(source)
        z, weights = self.attn(h, kv, need_weights=need_weights, mask=mask)
        x = x + self.res_dropout(z)
        x = x + self.res_dropout(self.ffn(self.norm_ffn(x)))
        return x, weights


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerLayer`: self-attention (no source) or cross-modal ``target <- source``.

    Inputs are scaled by sqrt(d) and given position codes, then dropped out (``embed_dropout``), as in MulT;
    a final LayerNorm closes the stack.  (B, T, d) [+ source (B, S, d)] -> (B, T, d).
    """

    def __init__(self, d: int, heads: int, layers: int, attn_dropout: float = 0.0, relu_dropout: float = 0.0,
                 res_dropout: float = 0.0, embed_dropout: float = 0.0, causal: bool = False,
                 attn_impl: str = "fused", attn_dropout_on: str = "weights"):
        super().__init__()
        self.scale, self.causal = math.sqrt(d), causal
        self.positions = SinusoidalPositions(d)
        self.embed_dropout = Dropout(embed_dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, heads, attn_dropout, relu_dropout, res_dropout, attn_impl, attn_dropout_on)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def _embed(self, x):
        return self.embed_dropout(self.scale * x + self.positions(x.shape[1], x.device, x.dtype))

    def forward(self, x, source=None, source_mask=None, x_mask=None, need_weights=False, attn_mask=None,
                x_embedded=False):
        """``x_mask`` / ``source_mask``: (B, T) / (B, S) pad masks; self-attention uses ``x_mask``.

        ``attn_mask`` (T, S) or (B, T, S), True where not allowed, replaces the causal mask.  ``x_embedded``: ``x``
        already holds what the stack should read (e.g. position codes as queries): no scaling, positions or
        dropout are added to it.
        """
        x = x if x_embedded else self._embed(x)  # (B, T, d)
        if source is None and self.causal and attn_mask is None and not need_weights and real_first_pays(x, x_mask):
            return causal_real_first(self.layers, self.norm, x, x_mask), [None] * len(self.layers)
        if source is not None:
            source = self._embed(source)  # (B, S, d)
        else:
            source_mask = x_mask
        s = x.shape[1] if source is None else source.shape[1]
        if attn_mask is None and self.causal:  # per sample on real frames when both paddings are known
            if x_mask is not None and source_mask is not None:
                attn_mask = causal_mask_from_padding(x_mask, source_mask)  # (B, T, S)
            else:
                attn_mask = causal_mask(x.shape[1], s, x.device)  # (T, S)
        mask = AttentionMask.build(source_mask, attn_mask)  # once for every layer
        weights = []
        for layer in self.layers:
            x, w = layer(x, source, mask, need_weights)
            weights.append(w)
        return self.norm(x), weights


# ----------------------------------------------------------------------------------------------------------------
# Knowledge transfer: theta, phi (the consistency losses) and delta's fusion


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, frames: torch.Tensor, kind: str) -> torch.Tensor:
    """Eq. 1's l_c: ``L_c(V->A) = l_c(theta(f_V), f_A)``, ``L_c(L->A) = l_c(phi(f_L), f_A)``, the mean L2 (or L1,
    Table V) error over the real ``frames`` (B, T) of both."""
    err = (pred - target).pow(2) if kind == "l2" else (pred - target).abs()  # (B, T, d)
    weight = frames.to(err.dtype)[..., None]  # (B, T, 1)
    return (err * weight).sum() / (weight.sum() * err.shape[-1]).clamp_min(1.0)


class Reconstruction(nn.Module):
    """One target modality t: theta (first source -> t) and phi (second source -> t) reconstruct t's
    representation (:func:`consistency_loss` compares them with f_t), :meth:`fuse` (delta) fuses them into f'_t.
    For the audio (the paper) the sources are vision (theta) and language (phi); ``KT_SOURCES`` lists them for every
    target.

    Each of theta, phi and delta ends in a linear read-out, so that the reconstructions live in the space of the
    target f_t (e.g. a trained model's projected audio, ``kt_target="run"``) rather than in a LayerNorm's.

    ``allowed`` ({source: (B,) bool}, optional) says per sample which sources may be read: the reconstruction
    from a source that is not allowed is zeroed before delta and its frames count as padding, so f'_t of that
    sample comes from the other source alone.
    """

    def __init__(self, cfg: ModelConfig, target: str):
        super().__init__()
        self.cfg, self.target, self.sources = cfg, target, KT_SOURCES[target]
        d, h = cfg.d, cfg.heads
        drop = dict(relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout, embed_dropout=cfg.embed_dropout,
                    attn_dropout=cfg.attn_dropout[target], attn_impl=cfg.attn_impl,
                    attn_dropout_on=cfg.attn_dropout_on)
        self.theta = TransformerEncoder(d, h, cfg.kt_layers, **drop)  # (first source) -> t
        self.phi = TransformerEncoder(d, h, cfg.kt_layers, **drop)  # (second source) -> t
        if cfg.kt_concat == "feature":
            self.fuse_in = nn.Linear(2 * d, d)  # [theta || phi] along features: (B, T, 2d) -> (B, T, d)
        else:
            self.segment = nn.Parameter(torch.zeros(2, d))  # tells the two halves apart along time
            nn.init.normal_(self.segment, std=0.02)
        self.delta = TransformerEncoder(d, h, cfg.kt_layers, **drop)
        self.read_theta, self.read_phi, self.read_delta = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def _transfer(self, net, s, f, pads):
        """theta or phi on source s: (B, T_s, d) -> the reconstruction on the configured time axis and its pad."""
        axis = self.cfg.time_axis
        if axis == "source" or (axis == "language" and s == "l"):
            return net(f[s], x_mask=pads[s])[0], pads[s]  # (B, T_s, d) on the source's time axis
        if axis == "language":
            return extras.transfer_to_word_slots(net, f[s], pads[s], pads["l"])  # (B, T_l, d)
        return extras.transfer_to_queries(net, f[s], pads[s], self.cfg.seq_lens[self.target])  # (B, T_t, d)

    def fuse(self, recs: list[torch.Tensor], rec_pads: list[torch.Tensor | None]) -> torch.Tensor:
        """Eq. 2: ``f'_A = delta([theta(f_V) || phi(f_L)])``, delta a transformer stack over the concatenation.

        ``kt_concat="feature"``: along features, (B, T, 2d) -> (B, T, d) by a linear map, then delta;
        ``"time"``: along time (B, 2T, d), each half marked by a learned segment code, the two halves of delta's
        output averaged.  Padding only where both reconstructions are.  Returns (B, T', d) before the read-out.
        """
        pad_hat = None if rec_pads[0] is None else rec_pads[0] & rec_pads[1]
        if self.cfg.kt_concat == "feature":
            return self.delta(self.fuse_in(torch.cat(recs, -1)), x_mask=pad_hat)[0]  # (B, T', d)
        t_len = recs[0].shape[1]
        both = torch.cat([recs[0] + self.segment[0], recs[1] + self.segment[1]], 1)  # (B, 2 T', d)
        both_pad = None if pad_hat is None else torch.cat(rec_pads, 1)
        fused = self.delta(both, x_mask=both_pad)[0]
        return 0.5 * (fused[:, :t_len] + fused[:, t_len:])  # (B, T', d): the two halves averaged

    def forward(self, f: dict, pads: dict, allowed: dict | None = None) -> dict:
        recs, rec_pads = [], []
        for net, read, s in zip((self.theta, self.phi), (self.read_theta, self.read_phi), self.sources, strict=True):
            rec, pad = self._transfer(net, s, f, pads)
            recs.append(read(rec))  # theta(f_V), phi(f_L) in the target's space
            if allowed is not None:  # a source that may not be read gives nothing to delta
                pad = None if pad is None else pad | ~allowed[s][:, None]
            rec_pads.append(pad)
        fused_in = recs if allowed is None else [r * allowed[s][:, None, None].to(r.dtype)
                                                 for r, s in zip(recs, self.sources, strict=True)]
        out = {f"{self.target}_from_{s}": rec for s, rec in zip(self.sources, recs, strict=True)}
        out[f"f_{self.target}_hat"] = self.read_delta(self.fuse(fused_in, rec_pads))
        out[f"mask_{self.target}_hat"] = None if rec_pads[0] is None else rec_pads[0] & rec_pads[1]
        return out


class KnowledgeTransfer(nn.Module):
    """Modality encoders giving f_L, f_V, f_A and one :class:`Reconstruction` per target modality.

    The paper's network is ``targets=("a",)``: theta: V -> A, phi: L -> A, delta fuses them into f'_A.  With
    ``targets=("l", "a", "v")`` (setting ``kt_any``) every modality can be rebuilt from the other two.

    ``forward(x, pads, allowed=None, present=None)`` takes the projected sequences (B, T_m, d) and their pad masks.
    Returns a dict with f_m, the reconstructions ``<t>_from_<s>`` = theta/phi(f_s) (e.g. ``a_from_v`` =
    theta(f_V)), ``f_<t>_hat`` = f'_t and ``mask_<t>_hat``.  With ``present`` (training only) also the target f_t
    (on the reconstruction's time axis) and the consistency losses ``loss_<s><t>`` (``loss_va`` =
    l_c(theta(f_V), f_A)) and ``loss_hat<t>`` = l_c(f'_t, f_t), over the real frames of samples where both the
    target and the source are present.
    """

    def __init__(self, cfg: ModelConfig, targets: tuple[str, ...] = ("a",)):
        super().__init__()
        self.cfg = cfg
        self.enc_l, self.enc_v, self.enc_a = (extras.modality_encoder(cfg, m) for m in ("l", "v", "a"))
        self.recon = nn.ModuleDict({t: Reconstruction(cfg, t) for t in targets})

    def encode(self, m: str, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        enc = getattr(self, f"enc_{m}")
        return x if isinstance(enc, nn.Identity) else enc(x, x_mask=pad)[0]

    def forward(self, x: dict, pads: dict, allowed: dict | None = None, present: dict | None = None,
                targets: tuple[str, ...] | None = None) -> dict:
        targets = tuple(self.recon) if targets is None else targets
        sources = {s for t in targets for s in KT_SOURCES[t]}
        f = {m: self.encode(m, x[m], pads[m]) for m in MODALITIES if m in sources}  # (B, T_m, d)
        out = {f"f_{m}": f[m] for m in f}
        for t in targets:
            out.update(self.recon[t](f, pads, allowed))
        if present is None:
            return out
        for t in targets:  # training: the real target supervises the reconstructions
            f_t, frames_t, present_t = extras.consistency_target(self, t, x[t], pads, present)  # (B, T', d)
            out[f"f_{t}"] = f_t
            if out[f"mask_{t}_hat"] is not None:  # compare only where the reconstruction has real frames too
                frames_t = frames_t & ~out[f"mask_{t}_hat"]
            for s in KT_SOURCES[t]:
                frames = frames_t & (present_t & present[s])[:, None]  # (B, T'): real target frames, present source
                out[f"loss_{s}{t}"] = consistency_loss(out[f"{t}_from_{s}"], f_t, frames, self.cfg.consistency)
            any_source = torch.stack([present[s] for s in KT_SOURCES[t]]).any(0)
            frames = frames_t & present_t[:, None] & any_source[:, None]
            out[f"loss_hat{t}"] = consistency_loss(out[f"f_{t}_hat"], f_t, frames, self.cfg.consistency)
        return out


# ----------------------------------------------------------------------------------------------------------------
# The MulT backbone, its prediction head, and the model of every setting


class MulTBackbone(nn.Module):
    """Cross-modal transformers ``target <- source`` for every kept target and every other input, a self-attention
    memory per target over the concatenated streams, then :meth:`predict` on the last time steps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        drop = dict(relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout, embed_dropout=cfg.embed_dropout,
                    attn_impl=cfg.attn_impl, attn_dropout_on=cfg.attn_dropout_on)
        self.pairs = [(t, s) for t in cfg.kept_targets for s in cfg.inputs if s != t]  # (source) -> target
        self.cross = nn.ModuleDict({
            f"trans_{t}_with_{s}": TransformerEncoder(d, cfg.heads, cfg.layers, attn_dropout=cfg.attn_dropout[t],
                                                      causal=cfg.causal, **drop)
            for t, s in self.pairs
        })
        self.mem = nn.ModuleDict()
        width = 0
        for t in cfg.kept_targets:
            n_src = sum(1 for tt, _ in self.pairs if tt == t) or 1  # a lone modality attends to itself
            self.mem[f"trans_{t}_mem"] = TransformerEncoder(n_src * d, cfg.heads, cfg.mem_layers,
                                                            attn_dropout=cfg.attn_dropout[t], causal=cfg.causal, **drop)
            width += n_src * d
        self.proj1, self.proj2 = nn.Linear(width, width), nn.Linear(width, width)
        self.out_dropout = Dropout(cfg.out_dropout)
        self.out_layer = nn.Linear(width, cfg.output_dim)

    def predict(self, last: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 5 (not in the paper's text, taken from MulT): the attended features combined and decoded.

        The last time step of every target's memory is concatenated, ``h = [h_L || h_A || h_V]`` (B, width), then
        a residual MLP and the output layer: ``y = W_out (W_2 ReLU(W_1 h) + h)``.  Returns (prediction, h).
        """
        h = torch.cat(last, -1)  # (B, width)
        hidden = self.proj2(self.out_dropout(F.relu(self.proj1(h)))) + h  # residual MLP
        return self.out_layer(hidden), h  # (B, output_dim)

    def forward(self, seqs: dict[str, torch.Tensor], pads: dict[str, torch.Tensor | None], need_weights=False):
        last, weights = [], {}
        for t in self.cfg.kept_targets:
            streams = []
            for s in (s for tt, s in self.pairs if tt == t):
                name = f"trans_{t}_with_{s}"
                h, weights[name] = self.cross[name](seqs[t], source=seqs[s], source_mask=pads[s], x_mask=pads[t],
                                                    need_weights=need_weights)
                streams.append(h)  # (B, T_t, d)  (s) -> t
            h = torch.cat(streams, -1) if streams else seqs[t]  # (B, T_t, n_src * d)
            h, weights[f"trans_{t}_mem"] = self.mem[f"trans_{t}_mem"](h, x_mask=pads[t], need_weights=need_weights)
            last.append(h[:, -1])  # last step: real under front padding  (B, n_src * d)
        out, pooled = self.predict(last)
        return out, pooled, weights


class KTModel(nn.Module):
    """The model of every setting (``SETTING_TABLE``): projections, the knowledge-transfer network, the backbone.

    ``forward(batch)`` takes a batch from :func:`ktlib.data.make_loader` (keys l, a, v, mask_l, mask_a, mask_v,
    present, optionally allowed) and returns the prediction: (B, 1) for regression, (B, 4, 2) logits for IEMOCAP.
    With ``return_details=True`` it returns ``(prediction, details)``: the knowledge-transfer pieces (f_a, f_a_hat,
    a_from_v = theta(f_V), a_from_l = phi(f_L), the consistency losses), the pooled representation and, with
    ``need_weights=True``, the attention weights of every block.

    A modality that is not ``allowed`` is never read (module docstring).  In ``kt`` the audio slot always holds
    f'_A; the real audio is read only in training, for the consistency target.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        reconstructs = SETTING_TABLE[cfg.setting].reconstructs
        needed = set(MODALITIES) if reconstructs else set(cfg.inputs)
        self.proj = nn.ModuleDict({m: ModalityProjection(cfg.feature_dims[m], cfg.d, cfg.kernels[m])
                                   for m in MODALITIES if m in needed})
        self.kt = KnowledgeTransfer(cfg, reconstructs) if reconstructs else None
        self.backbone = MulTBackbone(cfg)

    def project(self, batch, m, allowed=None):
        """(B, T_m, d) projection of modality m and its pad mask; rows that are not ``allowed`` are zeros."""
        x, pad = batch[m], batch[f"mask_{m}"]
        if allowed is not None and not bool(allowed.all()):
            x = torch.where(allowed[:, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
            pad = pad | ~allowed[:, None]
        if m == "l":
            x = dropout(x, self.cfg.text_dropout, self.training)
        return self.proj[m](x), pad

    @staticmethod
    def availability(batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(present, allowed)``, each {m: (B,) bool} (module docstring)."""
        ref = batch["l"]
        present = batch["present"].bool() if "present" in batch else torch.ones(
            ref.shape[0], len(MODALITIES), dtype=torch.bool, device=ref.device)
        allowed = present & batch["allowed"].bool() if "allowed" in batch else present
        return ({m: present[:, j] for j, m in enumerate(MODALITIES)},
                {m: allowed[:, j] for j, m in enumerate(MODALITIES)})

    def _reads(self) -> list[str]:
        """Modalities a forward pass reads: in training every projected one, else those a test batch may carry."""
        reads = MODALITIES if self.training else SETTING_TABLE[self.cfg.setting].reads_at_test
        return [m for m in MODALITIES if m in self.proj and m in reads]

    def leading_padding(self, batch: dict[str, torch.Tensor]) -> int:
        """How many leading steps ``forward(..., skip_padding=True)`` leaves out on the CPU: steps that are padding
        in every sample of every modality the pass reads (at least the last step is kept).

        Nothing reads them: attention never sees a padding key, every other layer acts on each step alone, the
        prediction reads the last step, and the kept steps keep their position codes (``SinusoidalPositions``'s
        ``skipped``).  So the pass computes the same function on fewer steps: up to float rounding, and with
        dropout's random numbers drawn for the shorter tensors.  Zero (nothing left out) unless every modality has
        one length and f'_A lives on it, fused along features (``kt_concat="time"`` gives delta a second half whose
        codes continue from the first), and unless the inputs are zero on the steps a projection's kernel reads
        across the cut.  On CUDA nothing is left out (counting would wait for the device).
        """
        reads = self._reads()
        pads = [batch[f"mask_{m}"] for m in reads]
        t = pads[0].shape[1]
        if (pads[0].device.type != "cpu" or any(p.shape[1] != t for p in pads)
                or (self.kt is not None and (self.cfg.time_axis != "source" or self.cfg.kt_concat != "feature"))):
            return 0
        real = ~torch.stack(pads).all(0).all(0)  # (T,) True on steps real in some sample of some modality
        cut = min(int(real.long().argmax()) if bool(real.any()) else t, t - 1)
        for m in reads:  # a kernel k reads k // 2 steps left of the first kept one: they must be zeros
            reach = self.cfg.kernels[m] // 2
            if cut and reach and bool(batch[m][:, max(cut - reach, 0):cut].any()):
                return 0
        return cut

    def forward(self, batch: dict[str, torch.Tensor], return_details: bool = False, need_weights: bool = False,
                skip_padding: bool = False):
        """The prediction of a batch (class docstring).  ``skip_padding``: compute it without the leading steps
        that are padding everywhere (:meth:`leading_padding`; the training loop's passes do), so the details'
        sequences are that much shorter."""
        cut = self.leading_padding(batch) if skip_padding and not need_weights else 0
        if cut == 0:
            return self._forward(batch, return_details, need_weights)
        steps = {key for m in self._reads() for key in (m, f"mask_{m}")}  # the sequences the pass reads
        batch = {k: (v[:, cut:] if k in steps else v) for k, v in batch.items()}
        codes = [module for module in self.modules() if isinstance(module, SinusoidalPositions)]
        for module in codes:
            module.skipped = cut
        try:
            return self._forward(batch, return_details, need_weights)
        finally:
            for module in codes:
                module.skipped = 0

    def _forward(self, batch: dict[str, torch.Tensor], return_details: bool, need_weights: bool):
        present, allowed = self.availability(batch)
        seqs, pads, details = {}, {}, {}
        if self.cfg.setting == "kt":  # the paper: l, v as given, the audio slot holds f'_A
            for m in ("l", "v"):
                seqs[m], pads[m] = self.project(batch, m, allowed[m])  # (B, T_m, d)
            if self.training:  # the audio supervises the reconstruction; never read at inference
                seqs["a"], pads["a"] = self.project(batch, "a")
            details = self.kt(seqs, pads, allowed, present if self.training else None)
            seqs["a"], pads["a"] = details["f_a_hat"], details["mask_a_hat"]  # (B, T', d)
        elif self.cfg.setting == "kt_any":
            seqs, pads, details = extras.rebuild_what_is_not_allowed(self, batch, present, allowed)
        else:
            for m in self.cfg.inputs:
                seqs[m], pads[m] = self.project(batch, m, allowed[m])  # (B, T_m, d)
        out, pooled, weights = self.backbone(seqs, pads, need_weights)
        if self.cfg.task == "classification":
            out = out.view(-1, 4, 2)  # (B, 4 emotions, no/yes)
        if not return_details:
            return out
        details = dict(details, pooled=pooled)
        if need_weights:
            details["attention"] = weights
        return out, details

    def consistency_term(self, details: dict) -> torch.Tensor:
        """``lambda1 * L_c(V->A) + lambda2 * L_c(L->A)`` (the consistency part of :meth:`paper_loss`), plus
        (beyond the paper) ``lambda3 * L_c(f'_A, f_A)`` with lambda3 = ``kt_hat_weight``; zero when there is
        nothing to compare.  In ``kt_any`` the sum runs over every target: lambda1 weighs theta's loss and lambda2
        phi's."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for t, (s1, s2) in KT_SOURCES.items():
            if f"loss_{s1}{t}" in details:
                total = total + self.cfg.lambda1 * details[f"loss_{s1}{t}"]
                total = total + self.cfg.lambda2 * details[f"loss_{s2}{t}"]
                if self.cfg.kt_hat_weight > 0:
                    total = total + self.cfg.kt_hat_weight * details[f"loss_hat{t}"]
        return total

    def paper_loss(self, task: torch.Tensor, details: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6: ``L = L_task + lambda1 * L_c(V->A) + lambda2 * L_c(L->A)``; returns (L, its consistency part).

        ``task``: L_task of the batch (:func:`ktlib.train.task_loss`); ``details``: this model's forward details.
        """
        consistency = self.consistency_term(details)
        return task + consistency, consistency

    @torch.no_grad()
    def audio_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """f_A of the batch's real audio on the reconstruction's time axis (B, T', d), and its real frames (B, T').

        What the reconstruction is trained to match (without dropout), for analysis only; predictions never use it.
        """
        if self.kt is None:
            raise ValueError(f"setting {self.cfg.setting!r} has no knowledge-transfer network; use a 'kt' model")
        return extras.target_features(self.kt, "a", self.proj["a"](batch["a"]), batch["mask_a"], batch["mask_l"])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
