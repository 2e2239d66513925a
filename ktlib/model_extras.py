"""What the model does beyond the paper, kept beside :mod:`ktlib.model`: the paper reads the same without it.

``kt_any`` (setting)
  Any modality a sample lacks is rebuilt from the ones it has, per sample: A from V, L; V from L, A; L from V, A
  (``KT_SOURCES``), one theta / phi / delta per target (:func:`rebuild_what_is_not_allowed`).  Allowed modalities
  enter as given; in training the present ones supervise the reconstructions.

Time axis of the reconstruction (``kt_time_axis``)
  ``source``   theta / phi are self-attention stacks over f_V / f_L, so f'_A lives on the source's time steps;
               possible when the sources and the audio share one length (word-aligned data).  The paper's case.
  ``language`` (unaligned ``kt``) f'_A lives on the word slots: phi is a self-attention stack over f_L; theta's
               queries are the word slots' position codes, each reading only the vision frames of its word's span
               of the utterance (:func:`transfer_to_word_slots`).  f'_A carries the language's pad mask, so no
               slot outside the utterance enters the backbone as a real frame, and the consistency target is f_A
               averaged over each word's span (:func:`ktlib.layers.pool_onto`), as word-aligned files average
               features.
  ``queries``  (unaligned ``kt_any``) queries are the target's T_t positions attending to the source
               (:func:`transfer_to_queries`); f'_t has the target's own length and no pad mask (its length is
               unknown at test time).
  ``auto``     (default) ``source`` when l, v and a have one sequence length, else ``language`` (``kt``) or
               ``queries`` (``kt_any``).
The consistency losses compare frames where both the target and the reconstruction are real.

The consistency target f_A (``kt_target``), always computed without dropout (:func:`target_features`)
  ``random``  (default of the class) f_A from the model's own audio projection and encoder, randomly initialised
              and never trained (gradient stopped): a fixed random view of the audio.
  ``trained`` the paper's loss read literally: the consistency gradient also reaches the audio projection and
              encoder, which nothing else trains, so f_A can shrink towards whatever is easiest to predict.
  ``run``     (the workbook's default) f_A is the audio projection of a finished run that saw real audio (the
              ``full`` run of the same seed, or an ``audio_only`` run), copied in by :func:`load_audio_encoder`
              and frozen: the audio as a model trained on the task reads it, i.e. what ``full`` puts in its audio
              slot.  Training reads that run from the store (``TrainConfig.target_run``).
  ``run_memory`` f_A is the self-attention memory's output over the audio of a finished ``audio_only`` run (its
              projection, then its memory stack, frozen): frame by frame, the audio as a model that predicts the
              label from the audio alone has encoded it, which keeps the audio's affect and drops much of what the
              label does not need (the projection keeps everything the audio has).
  ``kt_target_shuffle`` (placebo): each training sample's f_A comes from another sample of the batch
  (:func:`derangement`), so the target has the right distribution but says nothing about its own sample; a gain
  that survives it is regularisation.
  ``kt_hat_weight`` (lambda3, beyond the paper's loss) also supervises delta's output f'_A with l_c(f'_A, f_A).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import model as M
from .layers import pool_onto, span_mask_from_padding
from .specs import MODALITIES

KT_TARGETS = ("random", "trained", "run", "run_memory")  # where the consistency target f_A comes from (docstring)


def modality_encoder(cfg, m: str) -> nn.Module:
    """The encoder giving f_m from the projected modality m (identity when ``kt_encoder_layers == 0``)."""
    drop = dict(attn_dropout=cfg.attn_dropout[m], relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout,
                embed_dropout=cfg.embed_dropout, attn_impl=cfg.attn_impl, attn_dropout_on=cfg.attn_dropout_on)
    if m == "a" and cfg.kt_target == "run_memory":  # the audio_only run's memory stack, copied in later
        return M.TransformerEncoder(cfg.d, cfg.heads, cfg.mem_layers, causal=cfg.causal, **drop)
    if cfg.kt_encoder_layers == 0 or (m == "a" and cfg.kt_target == "run"):  # "run": f_A is the projection
        return nn.Identity()
    return M.TransformerEncoder(cfg.d, cfg.heads, cfg.kt_encoder_layers, **drop)


def transfer_to_word_slots(net: nn.Module, f_s: torch.Tensor, pad_s: torch.Tensor, pad_l: torch.Tensor):
    """theta on the ``language`` time axis: word slots as queries (their position codes), each reading the frames
    of source s said during its word.  (B, T_s, d) -> (B, T_l, d), with the language's pad mask."""
    queries = net.positions(pad_l.shape[1], f_s.device, f_s.dtype).expand(pad_l.shape[0], -1, -1)  # (B, T_l, d)
    blocked = span_mask_from_padding(pad_l, pad_s)  # (B, T_l, T_s)
    out = net(queries, source=f_s, source_mask=pad_s, x_mask=pad_l, attn_mask=blocked, x_embedded=True)[0]
    return out, pad_l  # (B, T_l, d)


def transfer_to_queries(net: nn.Module, f_s: torch.Tensor, pad_s: torch.Tensor, t_len: int):
    """theta or phi on the ``queries`` time axis: the target's ``t_len`` positions attend to source s.
    (B, T_s, d) -> (B, T_t, d), no pad mask."""
    queries = f_s.new_zeros(f_s.shape[0], t_len, f_s.shape[2])  # position codes only, added inside
    return net(queries, source=f_s, source_mask=pad_s)[0], None  # (B, T_t, d)


def target_features(kt: nn.Module, t: str, x: torch.Tensor, pad: torch.Tensor, pad_l: torch.Tensor | None = None):
    """The consistency target f_t of a projected target sequence, without dropout, and its real frames.

    Computed with the encoder in eval mode (the same f_t every time for the same input).  Its gradient is
    stopped unless ``kt_target="trained"``.  On the ``language`` time axis, f_t is averaged over each word's span
    (:func:`ktlib.layers.pool_onto`).  Returns ((B, T', d), (B, T') bool frames).
    """
    enc = getattr(kt, f"enc_{t}")
    was_training = enc.training
    enc.train(False)
    try:
        with torch.set_grad_enabled(torch.is_grad_enabled() and kt.cfg.kt_target == "trained"):
            f_t = kt.encode(t, x, pad)  # (B, T_t, d)
    finally:
        enc.train(was_training)
    if kt.cfg.kt_target != "trained":
        f_t = f_t.detach()
    frames = ~pad
    if kt.cfg.time_axis == "language" and pad_l is not None and t != "l":
        f_t, frames = pool_onto(f_t, pad, pad_l)  # (B, T_l, d) on the word slots
    return f_t, frames


def consistency_target(kt: nn.Module, t: str, x_t: torch.Tensor, pads: dict, present: dict):
    """f_t, its frames and ``present[t]`` for training, another sample's under ``kt_target_shuffle`` (placebo)."""
    pad_t, present_t = pads[t], present[t]
    if kt.cfg.kt_target_shuffle:  # another sample's audio, so nothing is specific to a sample
        perm = derangement(x_t.shape[0], x_t.device)
        x_t, pad_t, present_t = x_t[perm], pad_t[perm], present_t[perm]
    f_t, frames_t = target_features(kt, t, x_t, pad_t, pads.get("l"))
    return f_t, frames_t, present_t


def derangement(n: int, device=None) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (each sample paired with another), from torch's RNG."""
    if n < 2:
        return torch.arange(n, device=device)
    perm = torch.randperm(n, device=device)
    follower = torch.empty_like(perm)
    follower[perm] = torch.roll(perm, -1)  # i -> the sample after i in a random cycle
    return follower


def rebuild_what_is_not_allowed(model: nn.Module, batch: dict, present: dict, allowed: dict):
    """``kt_any``'s inputs to the backbone: every modality a sample may not read is rebuilt from those it may.

    In training the present ones are read (as targets) and every modality is rebuilt; at inference only the
    allowed ones are read, and only the modalities some sample lacks are rebuilt.  Returns (seqs, pads, details).
    """
    seqs, pads = {}, {}
    for m in MODALITIES:
        seqs[m], pads[m] = model.project(batch, m, present[m] if model.training else allowed[m])  # (B, T_m, d)
    rebuilt = tuple(m for m in MODALITIES if model.training or not bool(allowed[m].all()))
    details = model.kt(seqs, pads, allowed, present if model.training else None, targets=rebuilt)
    for m in rebuilt:
        hat, pad_hat = details[f"f_{m}_hat"], details[f"mask_{m}_hat"]
        if pad_hat is None:  # queries time axis: every reconstructed frame is real
            pad_hat = torch.zeros(hat.shape[:2], dtype=torch.bool, device=hat.device)
        seqs[m] = torch.where(allowed[m][:, None, None], seqs[m], hat.to(seqs[m].dtype))
        pads[m] = torch.where(allowed[m][:, None], pads[m], pad_hat)
    return seqs, pads, details


def load_audio_encoder(model: nn.Module, other: nn.Module) -> None:
    """Take ``model``'s consistency target f_A from a trained model ``other`` (``kt_target`` run / run_memory).

    Copies the audio projection (every setting with audio has one) and, when ``other`` is a ``kt`` model, its
    audio encoder (``run_memory``: the memory stack of an ``audio_only`` run).  From a ``full`` model with
    ``kt_encoder_layers=0``, f_A is exactly the projected audio that model learned to use; with encoder layers,
    those layers keep their own (frozen) weights.
    """
    if "a" not in getattr(other, "proj", {}):
        raise ValueError(f"the target's source run (setting {other.cfg.setting!r}) has no audio projection; use "
                         "a run that saw real audio (full or audio_only)")
    memory = model.cfg.kt_target == "run_memory"
    if memory and other.cfg.setting != "audio_only":
        raise ValueError(f"kt_target='run_memory' reads the memory of an audio_only run, got a "
                         f"{other.cfg.setting!r} run; plan it with target_from='audio_only'")
    model.proj["a"].load_state_dict(other.proj["a"].state_dict())
    if memory:
        model.kt.enc_a.load_state_dict(other.backbone.mem["trans_a_mem"].state_dict())
    elif model.kt is not None and other.kt is not None:
        model.kt.enc_a.load_state_dict(other.kt.enc_a.state_dict())
    model.proj["a"].requires_grad_(False)  # a fixed target: nothing in this model changes it
    if model.kt is not None:
        model.kt.enc_a.requires_grad_(False)


def validate_config(cfg) -> None:
    """Refuse a :class:`ktlib.model.ModelConfig` whose fields are out of range or do not fit together (ValueError
    naming the field); most of its options are the ones this module describes."""
    checks = [
        (cfg.setting in M.SETTING_TABLE, f"setting must be one of {tuple(M.SETTING_TABLE)}, got {cfg.setting!r}"),
        (cfg.task in ("regression", "classification"), f"task must be regression or classification, got "
                                                        f"{cfg.task!r}"),
        (len(cfg.targets) > 0 and set(cfg.targets) <= set(MODALITIES) and len(set(cfg.targets)) ==
         len(cfg.targets), f"targets must be distinct modalities among {MODALITIES}, got {cfg.targets}"),
        (cfg.d > 0 and cfg.heads > 0 and cfg.d % cfg.heads == 0,
         f"d ({cfg.d}) must be a positive multiple of heads ({cfg.heads})"),
        (cfg.layers >= 1 and cfg.mem_layers >= 1 and cfg.kt_layers >= 1 and cfg.kt_encoder_layers >= 0,
         "layers, mem_layers and kt_layers must be >= 1 (kt_encoder_layers >= 0)"),
        (cfg.kt_time_axis in ("auto", "source", "language", "queries"),
         f"kt_time_axis must be auto, source, language or queries, got {cfg.kt_time_axis!r}"),
        (cfg.kt_concat in ("feature", "time"), f"kt_concat must be feature or time, got {cfg.kt_concat!r}"),
        (cfg.kt_target in KT_TARGETS, f"kt_target must be one of {KT_TARGETS}, got {cfg.kt_target!r}"),
        (cfg.kt_hat_weight >= 0 and math.isfinite(cfg.kt_hat_weight),
         f"kt_hat_weight must be a finite number >= 0, got {cfg.kt_hat_weight}"),
        (cfg.kt_time_axis != "language" or cfg.setting != "kt_any",
         "kt_time_axis='language' is for the audio target of 'kt'; kt_any uses 'source' or 'queries'"),
        (cfg.consistency in ("l1", "l2"), f"consistency must be l1 or l2, got {cfg.consistency!r}"),
        (cfg.attn_impl in ("fused", "reference"), f"attn_impl must be fused or reference, got {cfg.attn_impl!r}"),
        (cfg.attn_dropout_on in ("weights", "keys"), f"attn_dropout_on must be weights or keys, got "
                                                      f"{cfg.attn_dropout_on!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for name in ("feature_dims", "seq_lens", "kernels", "attn_dropout"):
        value = getattr(cfg, name)
        if set(value) != set(MODALITIES):
            raise ValueError(f"{name} needs one entry per modality {MODALITIES}, got {sorted(value)}")
    for name in ("text_dropout", "embed_dropout", "relu_dropout", "res_dropout", "out_dropout",
                 *(f"attn_dropout[{m}]" for m in MODALITIES)):
        p = cfg.attn_dropout[name[-2]] if name.startswith("attn") else getattr(cfg, name)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {p}")
    if cfg.time_axis == "source" and len(set(cfg.seq_lens.values())) != 1:
        raise ValueError(f"kt_time_axis='source' needs l, a, v of one length, got {cfg.seq_lens}; use 'queries'")
