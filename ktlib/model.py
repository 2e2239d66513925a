"""The model: a MulT backbone with a knowledge-transfer network that reconstructs the missing audio.

One ``nn.Module`` per concept of the paper (Liu, Zhan, Chen, arXiv 2401.10747), each naming what it implements:

- :class:`ModalityProjection`   temporal Conv1d from a modality's features to the model width d (MulT).
- :class:`SinusoidalPositions`  fixed sinusoidal position codes added to every sequence (MulT).
- :class:`CrossModalAttention`  eq. 3: target m' queries, source m keys and values, multi-head scaled dot product.
- :class:`TransformerLayer`     eq. 4: pre-LayerNorm block, ``m' = m' + Z`` then a position-wise feed-forward.
- :class:`TransformerEncoder`   a stack of layers; self-attention when the source is the target itself,
                                 a cross-modal transformer ``target <- source`` otherwise.
- :class:`Reconstruction`       eq. 1-2 for one target: theta: V -> A and phi: L -> A reconstruct the audio
                                 representation, delta fuses ``[theta(f_V) || phi(f_L)]`` into f'_A (and likewise
                                 for a vision or language target).
- :class:`KnowledgeTransfer`    encoders give f_L, f_V, f_A; one Reconstruction per target; the consistency losses
                                 ``l_c(theta(f_V), f_A)`` and ``l_c(phi(f_L), f_A)`` (eq. 1, 6).
- :class:`MulTBackbone`         all directed cross-modal transformers among the inputs, a self-attention memory per
                                 target, last-step pooling, residual MLP head (MulT).
- :class:`KTModel`              the five settings of the paper's tables behind one switch.

Vocabulary: ``l`` / ``a`` / ``v`` for language, audio, vision; ``trans_l_with_a`` is the cross-modal transformer
whose target (queries) is l and source (keys, values) is a, written ``(A) -> L``.

Settings (``ModelConfig.setting``)
  full             l, a, v as given (real audio at train and test)
  vision_only      v alone;  language_only: l alone  (a self-attention encoder, no cross-modal pairs)
  language_vision  l and v, no audio branch
  kt               l, v and the reconstructed audio f'_A in the audio slot, at train and test.  The real audio is
                   read only in training, and only to compute the consistency target f_A.
  kt_any           (beyond the paper) any modality a sample lacks is rebuilt from the ones it has, per sample:
                   A from V, L; V from L, A; L from V, A (``KT_SOURCES``), one theta / phi / delta per target.
                   Present modalities enter as given; the real ones supervise the reconstructions in training.

Time axis of the reconstruction (``kt_time_axis``)
  ``source``   theta / phi are self-attention stacks over f_V / f_L, so f'_A lives on the source's time steps;
               possible when the sources and the audio share one length (word-aligned data).
  ``language`` (unaligned ``kt``) f'_A lives on the word slots: phi is a self-attention stack over f_L; theta's
               queries are the word slots' position codes, each reading only the vision frames of its word's span
               of the utterance (:func:`span_mask_from_padding`).  f'_A carries the language's padding mask, so no
               slot outside the utterance enters the backbone as a real frame, and the consistency target is f_A
               averaged over each word's span (:func:`pool_onto`), as word-aligned files average features.
  ``queries``  (unaligned ``kt_any``) queries are the target's T_t positions attending to the source; f'_t has
               the target's own length and no padding mask (its length is unknown at test time).
  ``auto``     (default) ``source`` when l, v and a have one sequence length, else ``language`` (``kt``) or
               ``queries`` (``kt_any``).
The consistency losses compare frames where both the target and the reconstruction are real.

The consistency target f_A (``kt_target``), always computed without dropout (the encoder in eval mode)
  ``random``  (default of the class) f_A from the model's own audio projection and encoder, randomly initialised
              and never trained (gradient stopped): a fixed random view of the audio.
  ``trained`` eq. 6 read literally: the consistency gradient also reaches the audio projection and encoder, which
              nothing else trains, so f_A can shrink towards whatever is easiest to predict.
  ``run``     (the workbook's default) f_A is the audio projection of a finished run that saw real audio (the
              ``full`` run of the same seed, or an ``audio_only`` run), copied in by
              :meth:`KTModel.load_audio_encoder` and frozen: the audio as a model trained on the task reads it,
              i.e. what ``full`` puts in its audio slot.  Training reads that run from the store
              (``TrainConfig.target_run``).
  ``run_memory`` f_A is the self-attention memory's output over the audio of a finished ``audio_only`` run (its
              projection, then its memory stack, frozen): frame by frame, the audio as a model that predicts the
              label from the audio alone has encoded it, which keeps the audio's affect and drops much of what the
              label does not need (the projection keeps everything the audio has).
  ``kt_target_shuffle`` (placebo): each training sample's f_A comes from another sample of the batch, so the target
  has the right distribution but says nothing about its own sample; a gain that survives it is regularisation.
  ``kt_hat_weight`` (lambda3, beyond eq. 6) also supervises delta's output f'_A with l_c(f'_A, f_A).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .specs import MODALITIES, Layout, get_layout

SETTINGS = ("full", "vision_only", "language_only", "language_vision", "kt")
EXTRA_SETTINGS = ("kt_any", "audio_only")  # beyond the paper: transfer for any missing modality; audio alone
SETTING_INPUTS = {  # which modality slots the backbone fuses; in kt the audio slot holds f'_A
    "full": ("l", "a", "v"),
    "vision_only": ("v",),
    "language_only": ("l",),
    "audio_only": ("a",),
    "language_vision": ("l", "v"),
    "kt": ("l", "a", "v"),
    "kt_any": ("l", "a", "v"),
}
KT_SETTINGS = {"kt": ("a",), "kt_any": ("l", "a", "v")}  # settings with knowledge transfer -> reconstructed targets
KT_TARGETS = ("random", "trained", "run", "run_memory")  # where the consistency target f_A comes from (docstring)


def _per_modality(l, a, v) -> dict[str, int | float]:
    return {"l": l, "a": a, "v": v}


@dataclass
class ModelConfig:
    """Every number the model needs.  Defaults: the paper's MOSI configuration (Table 5), word-aligned MOSI shapes."""

    # data
    feature_dims: dict[str, int] = field(default_factory=lambda: _per_modality(300, 5, 20))  # input widths
    seq_lens: dict[str, int] = field(default_factory=lambda: _per_modality(50, 50, 50))  # padded lengths
    task: str = "regression"  # regression: (B, 1) output; classification: IEMOCAP (B, 4, 2) logits
    # setting
    setting: str = "kt"  # full | vision_only | language_only | language_vision | kt
    targets: tuple[str, ...] = ("l", "a", "v")  # Table IV: target modalities whose cross-modal branch is kept
    # backbone (MulT)
    d: int = 40  # model width of every modality stream
    heads: int = 10  # attention heads (d divisible by heads)
    layers: int = 4  # depth of each cross-modal transformer
    mem_layers: int | None = None  # depth of each target's self-attention memory (None: MulT's max(layers, 3))
    kernels: dict[str, int] = field(default_factory=lambda: _per_modality(1, 3, 3))  # Conv1d kernel per modality
    causal: bool = True  # MulT's future mask (stretched to the source's length in cross-modal blocks)
    text_dropout: float = 0.2  # dropout on the language input features ("text-embedding dropout")
    embed_dropout: float = 0.2  # dropout after scaling + positions inside every transformer ("block dropout")
    attn_dropout: dict[str, float] = field(default_factory=lambda: _per_modality(0.1, 0.0, 0.0))  # per target
    relu_dropout: float = 0.1  # inside the feed-forward sublayer
    res_dropout: float = 0.1  # on each sublayer's output before the residual sum
    out_dropout: float = 0.1  # inside the residual MLP head
    attn_impl: str = "fused"  # fused: PyTorch's scaled_dot_product_attention | reference: explicit softmax(QK^T)V
    attn_dropout_on: str = "weights"  # weights: zero attention weights after the softmax (MulT) | keys: drop whole
    #                                    keys per sample and head before the softmax (far fewer random numbers)
    # knowledge transfer (used by setting "kt")
    kt_encoder_layers: int = 1  # depth of the modality encoders giving f_L, f_V, f_A
    kt_layers: int = 3  # depth of theta, phi and delta (the paper: transformer blocks of 3 layers)
    kt_time_axis: str = "auto"  # auto | source | language | queries: f'_A's time axis (module docstring)
    kt_concat: str = "feature"  # delta's concatenation of [theta(f_V) || phi(f_L)]: feature (2d wide) | time (2T)
    kt_target: str = "random"  # random | trained | run | run_memory: where the target f_A comes from (docstring)
    kt_target_shuffle: bool = False  # placebo: in training, each sample's f_A comes from another sample's audio
    kt_hat_weight: float = 0.0  # lambda3 (beyond eq. 6): weight of l_c(f'_A, f_A), supervising delta's output
    consistency: str = "l2"  # l2 (mean squared error, the paper's default) | l1 (Table V)
    lambda1: float = 1.0  # weight of l_c(theta(f_V), f_A) in eq. 6
    lambda2: float = 1.0  # weight of l_c(phi(f_L), f_A) in eq. 6

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.mem_layers is None:
            self.mem_layers = max(self.layers, 3)
        checks = [
            (self.setting in SETTINGS + EXTRA_SETTINGS, f"setting must be one of {SETTINGS + EXTRA_SETTINGS}, got "
                                                         f"{self.setting!r}"),
            (self.task in ("regression", "classification"), f"task must be regression or classification, got "
                                                            f"{self.task!r}"),
            (len(self.targets) > 0 and set(self.targets) <= set(MODALITIES) and len(set(self.targets)) ==
             len(self.targets), f"targets must be distinct modalities among {MODALITIES}, got {self.targets}"),
            (self.d > 0 and self.heads > 0 and self.d % self.heads == 0,
             f"d ({self.d}) must be a positive multiple of heads ({self.heads})"),
            (self.layers >= 1 and self.mem_layers >= 1 and self.kt_layers >= 1 and self.kt_encoder_layers >= 0,
             "layers, mem_layers and kt_layers must be >= 1 (kt_encoder_layers >= 0)"),
            (self.kt_time_axis in ("auto", "source", "language", "queries"),
             f"kt_time_axis must be auto, source, language or queries, got {self.kt_time_axis!r}"),
            (self.kt_concat in ("feature", "time"), f"kt_concat must be feature or time, got {self.kt_concat!r}"),
            (self.kt_target in KT_TARGETS, f"kt_target must be one of {KT_TARGETS}, got {self.kt_target!r}"),
            (self.kt_hat_weight >= 0 and math.isfinite(self.kt_hat_weight),
             f"kt_hat_weight must be a finite number >= 0, got {self.kt_hat_weight}"),
            (self.kt_time_axis != "language" or self.setting != "kt_any",
             "kt_time_axis='language' is for the audio target of 'kt'; kt_any uses 'source' or 'queries'"),
            (self.consistency in ("l1", "l2"), f"consistency must be l1 or l2, got {self.consistency!r}"),
            (self.attn_impl in ("fused", "reference"), f"attn_impl must be fused or reference, got {self.attn_impl!r}"),
            (self.attn_dropout_on in ("weights", "keys"), f"attn_dropout_on must be weights or keys, got "
                                                          f"{self.attn_dropout_on!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("feature_dims", "seq_lens", "kernels", "attn_dropout"):
            value = getattr(self, name)
            if set(value) != set(MODALITIES):
                raise ValueError(f"{name} needs one entry per modality {MODALITIES}, got {sorted(value)}")
        for name in ("text_dropout", "embed_dropout", "relu_dropout", "res_dropout", "out_dropout",
                     *(f"attn_dropout[{m}]" for m in MODALITIES)):
            p = self.attn_dropout[name[-2]] if name.startswith("attn") else getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {p}")
        if self.time_axis == "source" and len(set(self.seq_lens.values())) != 1:
            raise ValueError(f"kt_time_axis='source' needs l, a, v of one length, got {self.seq_lens}; use 'queries'")

    # --- derived values
    @property
    def target_from_run(self) -> bool:
        """Whether kt's consistency target is read from a finished run (``kt_target`` run or run_memory)."""
        return self.setting == "kt" and self.kt_target in ("run", "run_memory")

    @property
    def inputs(self) -> tuple[str, ...]:
        return SETTING_INPUTS[self.setting]

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

    # --- construction and serialisation
    @classmethod
    def for_layout(cls, layout: Layout | str, alignment: str = "aligned", preset: str = "paper",
                   **overrides) -> ModelConfig:
        """A configuration for a dataset's shapes, e.g. ``for_layout("mosi", "unaligned")``.

        ``preset="paper"``: the paper's Table 5 for that dataset; ``"mult_code"``: the official MulT code defaults.
        """
        layout = get_layout(layout, alignment) if isinstance(layout, str) else layout
        if preset not in ("paper", "mult_code"):
            raise ValueError(f"preset must be 'paper' or 'mult_code', got {preset!r}")
        base = dict(PAPER_CONFIGS.get(layout.dataset, {}) if preset == "paper" else MULT_CODE_DEFAULTS)
        base.update(feature_dims=dict(layout.feature_dims), seq_lens=dict(layout.seq_lens), task=layout.task)
        base.update(overrides)
        return cls(**base)

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


# The paper's Table 5 per dataset (d=40, 4 layers everywhere); kernels L/A/V.
PAPER_CONFIGS: dict[str, dict] = {
    "mosi": dict(heads=10, text_dropout=0.2, embed_dropout=0.2, out_dropout=0.1, kernels=_per_modality(1, 3, 3)),
    "mosei": dict(heads=8, text_dropout=0.3, embed_dropout=0.1, out_dropout=0.1, kernels=_per_modality(1, 3, 3)),
    "iemocap": dict(heads=10, text_dropout=0.3, embed_dropout=0.25, out_dropout=0.1, kernels=_per_modality(3, 5, 3)),
}


# The official MulT code's defaults (its command-line flags).
MULT_CODE_DEFAULTS: dict = dict(d=30, layers=5, heads=5, kernels=_per_modality(1, 1, 1), text_dropout=0.25,
                                embed_dropout=0.25, attn_dropout=_per_modality(0.1, 0.0, 0.0), relu_dropout=0.1,
                                res_dropout=0.1, out_dropout=0.0, causal=True)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


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

    The codes are computed once per (length, device, dtype) and reused (a plain cache, not a buffer: checkpoints
    hold no position codes).
    """

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, length: int, device=None, dtype=torch.float32) -> torch.Tensor:
        key = (length, torch.device(device or "cpu"), dtype)
        if key not in self._cache:
            self._cache[key] = self._codes(length, device).to(dtype)
        return self._cache[key]  # (T, d)

    def _codes(self, length: int, device=None) -> torch.Tensor:
        pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (T, 1)
        freq = torch.exp(torch.arange(0, self.d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / self.d))
        codes = torch.zeros(length, self.d, device=device)
        codes[:, 0::2] = torch.sin(pos * freq)
        codes[:, 1::2] = torch.cos(pos * freq[: self.d // 2])
        return codes  # (T, d)


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
    (CUDA), ``F.dropout``'s fused kernel is used as it is.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
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
    from b on, so that the fused kernel can leave those keys out (:meth:`causal_real_first`).
    """

    def __init__(self, blocked: torch.Tensor, chunks: tuple[tuple[int, int], ...] = ()):
        self.blocked, self.chunks = blocked, chunks
        self.empty = blocked.all(-1, keepdim=True)
        # whether any row is empty: asked once on the CPU (no device sync there), so that layers skip the zeroing
        self.has_empty = blocked.device.type != "cpu" or bool(self.empty.any())
        self._bias: dict[torch.dtype, torch.Tensor] = {}

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
    def causal_real_first(cls, real: torch.Tensor, t: int, chunk: int) -> AttentionMask:
        """Causal self-attention over sequences whose ``real`` (B, 1) real frames come first, padding after: row i
        sees key j when j <= i and j < n.  Row i sees no key after itself, so rows [a, b) need keys [0, b) only."""
        i = torch.arange(t, device=real.device)
        blocked = (i[None, :] > i[:, None]) | (i >= real)[:, None, :]  # (B, T, T)
        return cls(blocked[:, None], tuple((a, min(a + chunk, t)) for a in range(0, t, chunk)))

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bias:
            shut = self.blocked & ~self.empty
            self._bias[dtype] = torch.zeros(shut.shape, dtype=dtype, device=shut.device).masked_fill_(
                shut, float("-inf"))
        return self._bias[dtype]


class ExplicitAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + bias) * keep @ v`` and its gradient, for the CPU; ``keep``: dropout's mask or None.

    Each batched product is written so that d_k (4 or 8 in the paper's configurations) is the row count of its
    result, not its column count, e.g. ``out^T = v^T weights^T``: MKL is several times slower on results only d_k
    columns wide, and autograd's backward of the plain formula makes three of them.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, scale: float):
        scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, S)
        if bias is not None:
            scores += bias
        weights = scores.softmax(-1)
        kept = weights if keep is None else weights * keep
        ctx.save_for_backward(q, k, v, weights, keep)
        ctx.scale = scale
        return (v.transpose(-2, -1) @ kept.transpose(-2, -1)).transpose(-2, -1)  # (d_k, S) @ (S, T): (B, H, T, d_k)

    @staticmethod
    def backward(ctx, grad):  # grad (B, H, T, d_k)
        q, k, v, weights, keep = ctx.saved_tensors
        kept = weights if keep is None else weights * keep
        grad_v = (grad.transpose(-2, -1) @ kept).transpose(-2, -1)  # (d_k, T) @ (T, S)
        grad_w = grad @ v.transpose(-2, -1)  # (B, H, T, S)
        if keep is not None:
            grad_w = grad_w * keep
        grad_s = weights * (grad_w - (grad_w * weights).sum(-1, keepdim=True))  # through the softmax
        grad_q = (k.transpose(-2, -1) @ grad_s.transpose(-2, -1)).transpose(-2, -1) * ctx.scale  # (d_k, S) @ (S, T)
        grad_k = (q.transpose(-2, -1) @ grad_s).transpose(-2, -1) * ctx.scale  # (d_k, T) @ (T, S)
        return grad_q, grad_k, grad_v, None, None, None


# Score matrices (T x S per head) up to this size skip the fused kernel on the CPU: measured on 2 cores with
# d_k = 4, ExplicitAttention is 2x faster at 50 x 50, 1.3x at 500 x 50, as fast at 50 x 500, 2.7x slower at 500 x 500
SMALL_ATTENTION = 32 * 1024
CAUSAL_CHUNK = 128  # query rows per fused call in long causal self-attention (TransformerEncoder._causal_real_first)


class CrossModalAttention(nn.Module):
    """Eq. 3: ``CM_{m -> m'} = softmax(Q K^T / sqrt(d_k)) V`` with ``Q = X_{m'} W_Q``, ``K = X_m W_K``, ``V = X_m W_V``.

    Multi-head; parameters laid out as ``torch.nn.MultiheadAttention`` (``in_proj_weight`` (3d, d), ``out_proj``),
    so the two can share weights.  Uses PyTorch's fused ``scaled_dot_product_attention``, except: the plain formula
    when the attention weights are asked for (or ``impl="reference"``); on the CPU, :class:`ExplicitAttention` for
    dropout on the weights (the kernel has no fused dropout there) and for small score matrices.  Masks:
    ``key_padding_mask`` (B, S) and ``attn_mask`` (T, S), True where attention is not allowed (PyTorch's boolean
    convention for MultiheadAttention); ``attn_mask`` may also be per sample (B, T, S); or both already combined in
    an :class:`AttentionMask` (``mask``).  A query that may see no key at all (its source is absent or entirely in
    its future) gets a zero attention result, so the residual of eq. 4 leaves it as it was.  Every path computes
    the same function, up to float rounding.
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
        s = source.shape[1]
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        q = F.linear(query, w_q, b_q)  # (B, T, d)
        k, v = F.linear(source, w_kv, b_kv).chunk(2, dim=-1)  # (B, S, d) each
        q, k, v = (x.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for x in (q, k, v))  # (B, H, *, d_k)

        if mask is None:
            mask = AttentionMask.build(key_padding_mask, attn_mask)
        p = self.dropout if self.training else 0.0
        if p > 0 and self.dropout_on == "keys":  # drop whole keys per sample and head: (B, H, 1, S) draws
            dropped = torch.rand(b, self.heads, 1, s, device=query.device) < p
            mask = AttentionMask(dropped if mask is None else mask.blocked | dropped)
            p = 0.0
        bias = None if mask is None else mask.bias(q.dtype)  # (1|B, 1|H, T|1, S) 0 or -inf

        if need_weights or self.impl == "reference":  # eq. 3 as written, keeping the weights
            scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)  # (B, H, T, S)
            weights = scores.softmax(-1) if bias is None else (scores + bias).softmax(-1)
            out = dropout(weights, p, self.training) @ v  # (B, H, T, d_k)
            if need_weights and mask is not None:
                weights = weights.masked_fill(mask.empty, 0.0)
        elif q.device.type == "cpu" and (p > 0 or t * s <= SMALL_ATTENTION):
            # On the CPU the fused kernel has no dropout (with p > 0 it falls back to a plain path with F.dropout),
            # and on small score matrices its per-block overhead costs more than explicit products
            keep = dropout_mask((b, self.heads, t, s), p).to(q.dtype) if p > 0 else None
            out = ExplicitAttention.apply(q, k, v, bias, keep, (d // self.heads) ** -0.5)  # (B, H, T, d_k)
            weights = None
        elif mask is not None and len(mask.chunks) > 1:  # rows [a, b) see no key from b on: leave those out
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b],
                                                            attn_mask=bias[..., a:b, :b], dropout_p=p)
                             for a, b in mask.chunks], dim=2)  # (B, H, T, d_k)
            weights = None
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, d_k)
            weights = None
        if mask is not None and mask.has_empty:
            out = out.masked_fill(mask.empty, 0.0)
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, T, d)
        return self.out_proj(out), (weights if need_weights else None)


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
        """``x_mask`` / ``source_mask``: (B, T) / (B, S) True on padding; self-attention uses ``x_mask``.

        ``attn_mask`` (T, S) or (B, T, S), True where not allowed, replaces the causal mask.  ``x_embedded``: ``x``
        already holds what the stack should read (e.g. position codes as queries): no scaling, positions or
        dropout are added to it.
        """
        x = x if x_embedded else self._embed(x)
        if (source is None and self.causal and attn_mask is None and x_mask is not None and not need_weights
                and x.shape[1] >= 2 * CAUSAL_CHUNK and x.device.type == "cpu"):
            return self._causal_real_first(x, x_mask), [None] * len(self.layers)
        if source is not None:
            source = self._embed(source)
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

    def _causal_real_first(self, x, x_mask):
        """The causal self-attention stack on long front-padded sequences (CPU), computed with each sample's real
        frames moved to the front: the same result (every layer but attention acts on each step alone, and the
        attention sees the same keys), but each block of query rows then needs only the keys before its end, so
        the fused kernel skips about a third of the score matrix (:meth:`AttentionMask.causal_real_first`)."""
        t = x.shape[1]
        real = (~x_mask).sum(1, keepdim=True)  # (B, 1)
        steps = torch.arange(t, device=x.device)[None, :]
        to_front = ((steps + t - real) % t)[..., None].expand_as(x)  # (B, T, d): real frames first, then padding
        back = ((steps + real) % t)[..., None].expand_as(x)  # its inverse
        mask = AttentionMask.causal_real_first(real, t, CAUSAL_CHUNK)
        x = x.gather(1, to_front)
        for layer in self.layers:
            x = layer(x, None, mask)[0]
        return self.norm(x.gather(1, back))


# ----------------------------------------------------------------------------------------------------------------
# Knowledge transfer (eq. 1-2)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """l_c of eq. 1: mean over real frames (``frame_mask`` (B, T) True on frames to compare) of L2 or L1 error."""
    err = (pred - target).pow(2) if kind == "l2" else (pred - target).abs()  # (B, T, d)
    weight = frame_mask.to(err.dtype)[..., None]  # (B, T, 1)
    return (err * weight).sum() / (weight.sum() * err.shape[-1]).clamp_min(1.0)


KT_SOURCES = {"a": ("v", "l"), "v": ("l", "a"), "l": ("v", "a")}  # target -> (theta's source, phi's source)


class Reconstruction(nn.Module):
    """Eq. 1-2 for one target modality t: theta (first source -> t) and phi (second source -> t) reconstruct t's
    representation, delta fuses ``[theta(f_s1) || phi(f_s2)]`` into f'_t.  For the audio (the paper) the sources
    are vision (theta) and language (phi); ``KT_SOURCES`` lists them for every target.

    Each of theta, phi and delta ends in a linear read-out, so that the reconstructions live in the space of the
    target f_t (e.g. a trained model's projected audio, ``kt_target="run"``) rather than in a LayerNorm's.

    ``use`` ({source: (B,) bool}, optional) says per sample which sources may be used: the reconstruction from an
    unusable source is zeroed before delta and its frames count as padding, so f'_t of that sample comes from the
    other source alone.
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

    def _transfer(self, net, s, f, masks, t_len):
        """theta or phi on source s: (B, T_s, d) -> the reconstruction on the configured time axis and its mask."""
        axis = self.cfg.time_axis
        if axis == "source" or (axis == "language" and s == "l"):
            return net(f[s], x_mask=masks[s])[0], masks[s]  # (B, T_s, d) on the source's time axis
        if axis == "language":  # word slots as queries (position codes), each reading the frames of its word
            anchor = masks["l"]  # (B, T_l)
            queries = net.positions(anchor.shape[1], f[s].device, f[s].dtype).expand(anchor.shape[0], -1, -1)
            blocked = span_mask_from_padding(anchor, masks[s])  # (B, T_l, T_s)
            out = net(queries, source=f[s], source_mask=masks[s], x_mask=anchor, attn_mask=blocked,
                      x_embedded=True)[0]
            return out, anchor  # (B, T_l, d)
        queries = f[s].new_zeros(f[s].shape[0], t_len, f[s].shape[2])  # position codes only, added inside
        return net(queries, source=f[s], source_mask=masks[s])[0], None  # (B, T_t, d)

    def forward(self, f: dict, masks: dict, use: dict | None = None) -> dict:
        t_len = self.cfg.seq_lens[self.target]
        recs, rec_masks = [], []
        for net, read, s in zip((self.theta, self.phi), (self.read_theta, self.read_phi), self.sources, strict=True):
            rec, mask = self._transfer(net, s, f, masks, t_len)
            recs.append(read(rec))  # eq. 1: theta(f_V), phi(f_L) in the target's space
            if use is not None:  # an unusable source gives nothing to delta
                mask = None if mask is None else mask | ~use[s][:, None]
            rec_masks.append(mask)
        fused_in = recs if use is None else [r * use[s][:, None, None].to(r.dtype)
                                             for r, s in zip(recs, self.sources, strict=True)]
        mask_hat = None if rec_masks[0] is None else rec_masks[0] & rec_masks[1]  # padding only where both are
        # eq. 2: delta fuses [theta(f_V) || phi(f_L)] into f'_A
        if self.cfg.kt_concat == "feature":
            fused = self.delta(self.fuse_in(torch.cat(fused_in, -1)), x_mask=mask_hat)[0]  # (B, T_t', d)
        else:
            t_len = fused_in[0].shape[1]
            both = torch.cat([fused_in[0] + self.segment[0], fused_in[1] + self.segment[1]], 1)  # (B, 2 T_t', d)
            both_mask = None if mask_hat is None else torch.cat(rec_masks, 1)
            fused = self.delta(both, x_mask=both_mask)[0]
            fused = 0.5 * (fused[:, :t_len] + fused[:, t_len:])  # (B, T_t', d): the two halves averaged
        out = {f"{self.target}_from_{s}": rec for s, rec in zip(self.sources, recs, strict=True)}
        out[f"f_{self.target}_hat"], out[f"mask_{self.target}_hat"] = self.read_delta(fused), mask_hat
        return out


def derangement(n: int, device=None) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (each sample paired with another), from torch's RNG."""
    if n < 2:
        return torch.arange(n, device=device)
    perm = torch.randperm(n, device=device)
    follower = torch.empty_like(perm)
    follower[perm] = torch.roll(perm, -1)  # i -> the sample after i in a random cycle
    return follower


class KnowledgeTransfer(nn.Module):
    """Modality encoders giving f_L, f_V, f_A and one :class:`Reconstruction` per target modality.

    The paper's network is ``targets=("a",)``: theta: V -> A, phi: L -> A, delta fuses them into f'_A.  With
    ``targets=("l", "a", "v")`` (setting ``kt_any``) every modality can be rebuilt from the other two.

    ``forward(x, masks, use=None, real=None)`` takes the projected sequences (B, T_m, d) and their padding masks.
    ``use`` ({m: (B,) bool}) marks per sample the sources that may be used.  Returns a dict with f_m, the
    reconstructions ``<t>_from_<s>`` = theta/phi(f_s) (e.g. ``a_from_v`` = theta(f_V)), ``f_<t>_hat`` = f'_t and
    ``mask_<t>_hat``.  With ``real`` ({t: (B,) bool}, training only) also the target f_t (on the reconstruction's
    time axis) and the consistency losses ``loss_<s><t>`` (``loss_va`` = l_c(theta(f_V), f_A), eq. 1) and
    ``loss_hat<t>`` = l_c(f'_t, f_t), over the real frames of samples where both the target and the source are real.
    """

    def __init__(self, cfg: ModelConfig, targets: tuple[str, ...] = ("a",)):
        super().__init__()
        self.cfg = cfg

        def encoder(m):  # modality encoder giving f_m (identity when kt_encoder_layers == 0)
            drop = dict(attn_dropout=cfg.attn_dropout[m], relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout,
                        embed_dropout=cfg.embed_dropout, attn_impl=cfg.attn_impl, attn_dropout_on=cfg.attn_dropout_on)
            if m == "a" and cfg.kt_target == "run_memory":  # the audio_only run's memory stack, copied in later
                return TransformerEncoder(cfg.d, cfg.heads, cfg.mem_layers, causal=cfg.causal, **drop)
            if cfg.kt_encoder_layers == 0 or (m == "a" and cfg.kt_target == "run"):  # "run": f_A is the projection
                return nn.Identity()
            return TransformerEncoder(cfg.d, cfg.heads, cfg.kt_encoder_layers, **drop)

        self.enc_l, self.enc_v, self.enc_a = encoder("l"), encoder("v"), encoder("a")
        self.recon = nn.ModuleDict({t: Reconstruction(cfg, t) for t in targets})

    def encode(self, m: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        enc = getattr(self, f"enc_{m}")
        return x if isinstance(enc, nn.Identity) else enc(x, x_mask=mask)[0]

    def target(self, t: str, x: torch.Tensor, mask: torch.Tensor, anchor_mask: torch.Tensor | None = None):
        """The consistency target f_t of a projected target sequence, without dropout, and its real frames.

        Computed with the encoder in eval mode (the same f_t every time for the same input).  Its gradient is
        stopped unless ``kt_target="trained"`` (eq. 6 read literally).  On the ``language`` time axis, f_t is
        averaged over each word's span (:func:`pool_onto`).  Returns ((B, T', d), (B, T') bool real frames).
        """
        enc = getattr(self, f"enc_{t}")
        was_training = enc.training
        enc.train(False)
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.kt_target == "trained"):
                f_t = self.encode(t, x, mask)  # (B, T_t, d)
        finally:
            enc.train(was_training)
        if self.cfg.kt_target != "trained":
            f_t = f_t.detach()
        real = ~mask
        if self.cfg.time_axis == "language" and anchor_mask is not None and t != "l":
            f_t, real = pool_onto(f_t, mask, anchor_mask)  # (B, T_l, d) on the word slots
        return f_t, real

    def forward(self, x: dict, masks: dict, use: dict | None = None, real: dict | None = None,
                targets: tuple[str, ...] | None = None) -> dict:
        targets = tuple(self.recon) if targets is None else targets
        sources = {s for t in targets for s in KT_SOURCES[t]}
        f = {m: self.encode(m, x[m], masks[m]) for m in MODALITIES if m in sources}  # (B, T_m, d)
        out = {f"f_{m}": f[m] for m in f}
        for t in targets:
            out.update(self.recon[t](f, masks, use))
        if real is None:
            return out
        for t in targets:  # training: the real target supervises the reconstructions
            x_t, mask_t, real_t = x[t], masks[t], real[t]
            if self.cfg.kt_target_shuffle:  # placebo: another sample's audio, so nothing is specific to a sample
                perm = derangement(x_t.shape[0], x_t.device)
                x_t, mask_t, real_t = x_t[perm], mask_t[perm], real_t[perm]
            f_t, frames_t = self.target(t, x_t, mask_t, masks.get("l"))
            out[f"f_{t}"] = f_t
            hat_mask = out[f"mask_{t}_hat"]
            if hat_mask is not None:  # compare only where the reconstruction has real frames too
                frames_t = frames_t & ~hat_mask
            for s in KT_SOURCES[t]:
                frames = frames_t & (real_t & real[s])[:, None]  # (B, T'): real target frames, real source
                out[f"loss_{s}{t}"] = consistency_loss(out[f"{t}_from_{s}"], f_t, frames, self.cfg.consistency)
            frames = frames_t & real_t[:, None] & torch.stack([real[s] for s in KT_SOURCES[t]]).any(0)[:, None]
            out[f"loss_hat{t}"] = consistency_loss(out[f"f_{t}_hat"], f_t, frames, self.cfg.consistency)
        return out


# ----------------------------------------------------------------------------------------------------------------
# MulT backbone and the full model


class MulTBackbone(nn.Module):
    """Cross-modal transformers ``target <- source`` for every kept target and every other input, a self-attention
    memory per target over the concatenated streams, the last time step, a residual MLP and a linear output."""

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

    def forward(self, seqs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor | None], need_weights=False):
        last, weights = [], {}
        for t in self.cfg.kept_targets:
            streams = []
            for tt, s in self.pairs:
                if tt != t:
                    continue
                name = f"trans_{t}_with_{s}"
                h, w = self.cross[name](seqs[t], source=seqs[s], source_mask=masks[s], x_mask=masks[t],
                                        need_weights=need_weights)
                streams.append(h)  # (B, T_t, d)  (s) -> t
                weights[name] = w
            h = torch.cat(streams, -1) if streams else seqs[t]  # (B, T_t, n_src * d)
            h, w = self.mem[f"trans_{t}_mem"](h, x_mask=masks[t], need_weights=need_weights)
            weights[f"trans_{t}_mem"] = w
            last.append(h[:, -1])  # last step: real under front padding  (B, n_src * d)
        last = torch.cat(last, -1)  # (B, width)
        hidden = self.proj2(self.out_dropout(F.relu(self.proj1(last)))) + last  # residual MLP
        return self.out_layer(hidden), last, weights


class KTModel(nn.Module):
    """The model of every setting: projections, the knowledge-transfer network (``kt``, ``kt_any``), the backbone.

    ``forward(batch)`` takes a batch from :func:`ktlib.data.make_loader` (keys l, a, v, mask_l, mask_a, mask_v,
    present) and returns the prediction: (B, 1) for regression, (B, 4, 2) logits for IEMOCAP.  With
    ``return_details=True`` it returns ``(prediction, details)``: the knowledge-transfer pieces (f_a, f_a_hat,
    a_from_v = theta(f_V), a_from_l = phi(f_L), the consistency losses), the pooled representation and, with
    ``need_weights=True``, the attention weights of every block.

    Missing inputs.  ``present`` (B, 3) marks the modalities a sample has; an optional ``keep`` (B, 3) narrows
    what the model may use (training simulates missing modalities with it, while the real ones still supervise
    the reconstructions).  A modality that is not used is never read: its rows are replaced by zeros marked as
    padding (MulT "zero-fill"), whatever the batch holds there.  In ``kt_any`` they are replaced by their
    reconstruction from the modalities that are used.

    The audio tensor is read only where it is used: in ``full`` and ``kt_any`` where it is present, and in ``kt``
    training for the consistency target.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        reconstructs = cfg.setting in KT_SETTINGS
        needed = set(MODALITIES) if reconstructs else set(cfg.inputs)
        self.proj = nn.ModuleDict({m: ModalityProjection(cfg.feature_dims[m], cfg.d, cfg.kernels[m])
                                   for m in MODALITIES if m in needed})
        self.kt = KnowledgeTransfer(cfg, KT_SETTINGS[cfg.setting]) if reconstructs else None
        self.backbone = MulTBackbone(cfg)

    def reads_audio(self) -> bool:
        """Whether a forward pass in the current mode reads the batch's audio (where it is present)."""
        return self.cfg.setting in ("full", "kt_any") or (self.cfg.setting == "kt" and self.training)

    def _project(self, batch, m, use=None):
        """(B, T_m, d) projection of modality m and its padding mask; rows where ``use`` is False are zeros."""
        x, mask = batch[m], batch[f"mask_{m}"]
        if use is not None and not bool(use.all()):
            x = torch.where(use[:, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
            mask = mask | ~use[:, None]
        if m == "l":
            x = dropout(x, self.cfg.text_dropout, self.training)
        return self.proj[m](x), mask

    @staticmethod
    def availability(batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(real, use)``, each {m: (B,) bool}: the modalities a sample carries (``present``; all without it), and
        those it may use (``real`` narrowed by ``keep``)."""
        ref = batch["l"]
        real = batch["present"].bool() if "present" in batch else torch.ones(
            ref.shape[0], len(MODALITIES), dtype=torch.bool, device=ref.device)
        use = real & batch["keep"].bool() if "keep" in batch else real
        return ({m: real[:, j] for j, m in enumerate(MODALITIES)}, {m: use[:, j] for j, m in enumerate(MODALITIES)})

    def forward(self, batch: dict[str, torch.Tensor], return_details: bool = False, need_weights: bool = False):
        cfg = self.cfg
        real, use = self.availability(batch)
        supervise = real if self.training else None  # real targets for the consistency losses, in training only
        seqs, masks, details = {}, {}, {}
        if cfg.setting == "kt":  # the paper: l, v as given, the audio slot always holds f'_A
            for m in ("l", "v"):
                seqs[m], masks[m] = self._project(batch, m, use[m])
            if self.training:  # the audio supervises the reconstruction; never read at inference
                seqs["a"], masks["a"] = self._project(batch, "a")
            details = self.kt(seqs, masks, use, supervise)
            seqs["a"], masks["a"] = details["f_a_hat"], details["mask_a_hat"]
        elif cfg.setting == "kt_any":  # every modality a sample lacks is rebuilt from those it has
            for m in MODALITIES:  # in training the real ones are read (targets); at inference only the usable
                seqs[m], masks[m] = self._project(batch, m, real[m] if self.training else use[m])
            lacking = tuple(m for m in MODALITIES if self.training or not bool(use[m].all()))
            details = self.kt(seqs, masks, use, supervise, targets=lacking)
            for m in lacking:
                hat, mask_hat = details[f"f_{m}_hat"], details[f"mask_{m}_hat"]
                if mask_hat is None:  # queries time axis: every reconstructed frame is real
                    mask_hat = torch.zeros(hat.shape[:2], dtype=torch.bool, device=hat.device)
                seqs[m] = torch.where(use[m][:, None, None], seqs[m], hat.to(seqs[m].dtype))
                masks[m] = torch.where(use[m][:, None], masks[m], mask_hat)
        else:
            for m in cfg.inputs:
                seqs[m], masks[m] = self._project(batch, m, use[m])
        out, pooled, weights = self.backbone(seqs, masks, need_weights)
        if cfg.task == "classification":
            out = out.view(-1, 4, 2)  # (B, 4 emotions, no/yes)
        if not return_details:
            return out
        details = dict(details, pooled=pooled)
        if need_weights:
            details["attention"] = weights
        return out, details

    @torch.no_grad()
    def audio_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """f_A of the batch's real audio on the reconstruction's time axis (B, T', d), and its real frames (B, T').

        What the reconstruction is trained to match (without dropout), for analysis only (reconstructed vs real
        audio); predictions never use it.
        """
        if self.kt is None:
            raise ValueError(f"setting {self.cfg.setting!r} has no knowledge-transfer network; use a 'kt' model")
        return self.kt.target("a", self.proj["a"](batch["a"]), batch["mask_a"], batch["mask_l"])

    def consistency_term(self, details: dict) -> torch.Tensor:
        """eq. 6's consistency part: lambda1 * L_c(V->A) + lambda2 * L_c(L->A), plus (beyond eq. 6)
        lambda3 * L_c(f'_A, f_A) with lambda3 = ``kt_hat_weight``; zero when there is nothing to compare.

        In ``kt_any`` the sum runs over every target: lambda1 weighs theta's loss and lambda2 phi's.
        """
        total = torch.zeros((), device=next(self.parameters()).device)
        for t, (s1, s2) in KT_SOURCES.items():
            if f"loss_{s1}{t}" in details:
                total = total + self.cfg.lambda1 * details[f"loss_{s1}{t}"]
                total = total + self.cfg.lambda2 * details[f"loss_{s2}{t}"]
                if self.cfg.kt_hat_weight > 0:
                    total = total + self.cfg.kt_hat_weight * details[f"loss_hat{t}"]
        return total

    def load_audio_encoder(self, other: KTModel) -> None:
        """Take the audio side of the consistency target from a trained model.

        Copies the audio projection (every setting with audio has one) and, when ``other`` is a ``kt`` model, its
        audio encoder.  From a ``full`` model with ``kt_encoder_layers=0``, f_A is exactly the projected audio
        that model learned to use; with encoder layers, those layers keep their own (frozen) weights.
        """
        if "a" not in getattr(other, "proj", {}):
            raise ValueError(f"the target's source run (setting {other.cfg.setting!r}) has no audio projection; use "
                             "a run that saw real audio (full or audio_only)")
        memory = self.cfg.kt_target == "run_memory"
        if memory and other.cfg.setting != "audio_only":
            raise ValueError(f"kt_target='run_memory' reads the memory of an audio_only run, got a "
                             f"{other.cfg.setting!r} run; plan it with target_from='audio_only'")
        self.proj["a"].load_state_dict(other.proj["a"].state_dict())
        if memory:
            self.kt.enc_a.load_state_dict(other.backbone.mem["trans_a_mem"].state_dict())
        elif self.kt is not None and other.kt is not None:
            self.kt.enc_a.load_state_dict(other.kt.enc_a.state_dict())
        self.proj["a"].requires_grad_(False)  # a fixed target: nothing in this model changes it
        if self.kt is not None:
            self.kt.enc_a.requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: config + state_dict + metrics, loadable with weights_only=True


def save_checkpoint(path, model: KTModel, metrics: dict | None = None, extra: dict | None = None) -> None:
    """Write ``{config, state_dict, metrics, extra}`` (plain types and tensors only) atomically."""
    from pathlib import Path

    from .data import atomic_write

    payload = {"config": model.cfg.to_dict(), "state_dict": model.state_dict(), "metrics": dict(metrics or {}),
               "extra": dict(extra or {})}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu") -> tuple[KTModel, dict]:
    """Rebuild the model (in eval mode) from a checkpoint read with ``torch.load(weights_only=True)``."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = KTModel(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload
