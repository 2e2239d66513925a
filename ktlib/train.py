"""Training: one ``fit`` for every setting and dataset, on CUDA when present and on the CPU otherwise.

- Task loss per dataset: L1 for MOSI / MOSEI regression, cross-entropy over the four binary emotions of IEMOCAP;
  in setting ``kt`` plus ``lambda1 * L_c(V->A) + lambda2 * L_c(L->A)`` (:meth:`ktlib.model.KTModel.paper_loss`).
- Adam, gradient clipping, ReduceLROnPlateau on the validation loss (MulT) or the paper's constant rate,
  early stopping, and the best model by validation loss.  Mixed precision (bfloat16 autocast) on CUDA.
- Validation and test batches never carry audio in the missing-audio settings: the model is selected and scored
  exactly as it will be used.
- Checkpoints after every epoch hold the model, optimiser, scheduler, random state (CPU and CUDA generators) and
  history, so a run that is killed resumes from its last finished epoch and ends where an uninterrupted run would
  (on the CPU); its metrics list the epochs it resumed at (``resumed_at``, empty for a run never interrupted).
- Profiles (``smoke`` / ``quick`` / ``paper``), named bundles of model and training settings: :mod:`ktlib.config`.

Missing data beyond the paper (``TrainConfig``)
- ``protocol``: a :class:`ktlib.missing.Protocol`.  Its validation and test masks select and score the model; a
  ``train_test`` protocol also masks the model's training inputs, drawn afresh each epoch.  Training batches are
  read complete and narrowed with an ``allowed`` matrix (see :mod:`ktlib.model`), so the real modalities a
  sample lacks can still supervise a reconstruction or feed a teacher, as in the systems that use this protocol.
- ``train_drop="subsets"``: each training sample uses one of the 7 non-empty subsets of its modalities, uniformly
  (models meant to work with any subset: ``kt_any`` and the distillation student).
- Distillation (MITR-DNet style): ``distill_pred`` and ``distill_rep`` weigh the squared distance of the
  student's prediction and pooled representation to those of a teacher (a finished run of the store named by
  ``teacher``) that sees the complete batch.  The teacher is used in training only.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .checkpoint import load_state, save_state
from .data import MultimodalData, make_loader, presence_matrix
from .missing import Protocol, narrow, subset_presence
from .model import SETTING_TABLE, KTModel, ModelConfig
from .model_extras import load_audio_encoder


@dataclass
class TrainConfig:
    """How to train.  ``ktlib.config.profile("quick").train_config()`` gives a named bundle's."""

    epochs: int = 40  # the paper trains 40 epochs
    batch_size: int = 24
    lr: float = 1e-3
    clip: float = 0.8  # gradient-norm clipping
    schedule: str = "plateau"  # plateau: ReduceLROnPlateau on valid loss (MulT) | constant: the paper's fixed rate
    plateau_patience: int = 20
    plateau_factor: float = 0.1
    early_stop: int = 0  # stop after this many epochs without a better valid loss (0: never)
    seed: int = 1
    device: str = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on the CPU)
    # missing data (module docstring)
    protocol: Protocol | dict | None = None  # missing-data protocol for validation / test (and training)
    train_drop: str = "none"  # none | subsets: simulate missing modalities in training
    distill_pred: float = 0.0  # weight of ||student prediction - teacher prediction||^2
    distill_rep: float = 0.0  # weight of ||student pooled representation - teacher's||^2
    teacher: str = ""  # run id of the teacher in the same run store (needed when a distill weight is > 0)
    target_run: str = ""  # kt with kt_target="run": the finished run whose audio projection gives f_A

    def __post_init__(self):
        if isinstance(self.protocol, dict):
            self.protocol = Protocol(**{**self.protocol, "modalities": tuple(self.protocol.get("modalities", ()))})
        if self.protocol is not None and not isinstance(self.protocol, Protocol):
            raise ValueError(f"protocol must be a ktlib.missing.Protocol or None, got {type(self.protocol).__name__}")
        if self.train_drop not in ("none", "subsets"):
            raise ValueError(f"train_drop must be 'none' or 'subsets', got {self.train_drop!r}")
        for name in ("distill_pred", "distill_rep"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if (self.distill_pred > 0 or self.distill_rep > 0) != bool(self.teacher):
            raise ValueError("distillation needs both a teacher run id (teacher=...) and a weight > 0 "
                             f"(distill_pred={self.distill_pred}, distill_rep={self.distill_rep}, "
                             f"teacher={self.teacher!r})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.schedule not in ("plateau", "constant"):
            raise ValueError(f"schedule must be 'plateau' or 'constant', got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) in one place."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global generator user code may use
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over the model's parameters in PyTorch's fused implementation (one kernel per device and dtype): on
    these small models the per-parameter loop of the default implementation costs more than its arithmetic.
    The same updates up to float rounding (about 1e-7 relative per step)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def task_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """L1 for regression (B, 1); mean cross-entropy over the four binary emotions for IEMOCAP (B, 4, 2)."""
    if task == "classification":
        return F.cross_entropy(out.reshape(-1, 2).float(), y.reshape(-1))
    return F.l1_loss(out.float(), y.float())


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_loader(data: MultimodalData, split: str, batch_size: int, setting: str,
                protocol: Protocol | None = None):
    """The loader a model of ``setting`` is selected and scored on: no audio where the setting has none at test
    time, and the protocol's missing modalities (never read).  Frame-level missing acts in :func:`evaluate`."""
    n = len(data[split])
    present = presence_matrix(n, SETTING_TABLE[setting].absent_at_test)
    if protocol is not None:
        present = present & protocol.presence(n, split)
    return make_loader(data, split, batch_size, shuffle=False, missing=present)


def frames_dropped(protocol: Protocol | None, split: str) -> bool:
    """Whether ``protocol`` drops frames in ``split`` batches (the other kinds act through the loader's presence)."""
    return protocol is not None and protocol.kind == "frame" and protocol.applies_to(split)


@torch.no_grad()
def evaluate(model: KTModel, loader, device: torch.device, amp: bool = False, protocol: Protocol | None = None,
             split: str = "test") -> tuple[float, dict, np.ndarray]:
    """Mean task loss, metrics and predictions over a loader (model in eval mode).

    With a frame-level ``protocol``, each batch of ``split`` has its frames dropped first (the same frames for
    every model: the draws are keyed on the sample index).
    """
    model.eval()
    total, count, preds, ys = 0.0, 0, [], []
    for batch in loader:
        if frames_dropped(protocol, split):
            batch = protocol.apply_batch(batch, split)[0]
        batch = _to(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = model(batch, skip_padding=True)
        loss = task_loss(out, batch["y"], model.cfg.task)
        total += loss.item() * len(batch["y"])
        count += len(batch["y"])
        preds.append(out.float().cpu().numpy())
        ys.append(batch["y"].cpu().numpy())
    pred, y = np.concatenate(preds), np.concatenate(ys)
    if not np.isfinite(pred).all():
        raise FloatingPointError("the model produced NaN/inf predictions; lower the learning rate or check inputs")
    return total / max(count, 1), M.task_metrics(pred, y, model.cfg.task), pred


KILL_HOOK = "KTLIB_TEST_KILL_AFTER_CHECKPOINT"


def _kill_hook(checkpoint: Path) -> None:
    """Test hook (tests/test_cluster.py): when ``$KTLIB_TEST_KILL_AFTER_CHECKPOINT`` names a file that exists, the
    first process to write a checkpoint after it appeared deletes it, leaves ``<file>.killed`` naming the run
    folder, and SIGKILLs itself: a worker dies mid-run, once, at a known point, to show that no run is lost."""
    armed = os.environ.get(KILL_HOOK)
    if not armed:
        return
    try:
        os.unlink(armed)  # exactly one process succeeds
    except FileNotFoundError:
        return
    Path(armed + ".killed").write_text(str(checkpoint.parent))
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class FitResult:
    model: KTModel
    history: list[dict]  # one row per epoch
    metrics: dict  # {"valid": {...}, "test": {...}, "best_epoch": int, "resumed_at": [int], "seconds": float, ...}


def train_allowed(train_cfg: TrainConfig, n: int, epoch: int) -> np.ndarray | None:
    """(n, 3) bool: the modalities each training sample is allowed to feed the model in ``epoch`` (None: all it
    has; the mask vocabulary is in :mod:`ktlib.model`).

    A ``train_test`` protocol's fixed or modality-level pattern, narrowed by ``train_drop="subsets"``; fresh
    draws every epoch, reproducible from the seeds.
    """
    allowed = None
    protocol = train_cfg.protocol
    if protocol is not None and protocol.applies_to("train") and protocol.kind in ("fixed", "modality"):
        allowed = protocol.presence(n, "train", epoch)
    if train_cfg.train_drop == "subsets":
        drop = subset_presence(n, [train_cfg.seed, 7, epoch])
        allowed = drop if allowed is None else narrow(allowed, drop)
    return allowed


def distillation_loss(out: torch.Tensor, pooled: torch.Tensor, teacher_out: torch.Tensor,
                      teacher_pooled: torch.Tensor, train_cfg: TrainConfig) -> torch.Tensor:
    """``distill_pred * MSE(prediction, teacher's) + distill_rep * MSE(pooled, teacher's)`` (MITR-DNet style),
    added to the paper's loss (:meth:`ktlib.model.KTModel.paper_loss`) when a teacher is given.

    Predictions are compared as they are: regression scores, or IEMOCAP logits.
    """
    return (train_cfg.distill_pred * F.mse_loss(out.float(), teacher_out.float())
            + train_cfg.distill_rep * F.mse_loss(pooled.float(), teacher_pooled.float()))


@dataclass
class _Run:
    """What one :func:`fit` carries from epoch to epoch: the model, its optimiser, and what a checkpoint saves."""

    model: KTModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    device: torch.device
    amp: bool
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"loss": float("inf"), "epoch": -1, "state": None})
    start_epoch: int = 0
    seconds: float = 0.0
    resumed: list[int] = field(default_factory=list)  # the epochs at which an interrupted run went on

    @property
    def stale(self) -> int:
        """Epochs since the best validation loss (every epoch so far while there is none)."""
        return len(self.history) - 1 - self.best["epoch"]


def _check_fit_inputs(model_cfg: ModelConfig, train_cfg: TrainConfig, teacher: KTModel | None,
                      audio_source: KTModel | None) -> None:
    if bool(train_cfg.teacher) != (teacher is not None):
        raise ValueError(f"train_cfg.teacher={train_cfg.teacher!r} but teacher={'a model' if teacher else None}: "
                         "distillation needs both the run id and the model (load_or_train passes it from the store)")
    wants_source = model_cfg.target_from_run
    if wants_source != bool(train_cfg.target_run) or bool(train_cfg.target_run) != (audio_source is not None):
        raise ValueError(f"kt_target='run' (setting {model_cfg.setting!r}, kt_target {model_cfg.kt_target!r}) needs "
                         f"both train_cfg.target_run (got {train_cfg.target_run!r}) and the finished run's model "
                         f"(got {'a model' if audio_source is not None else None}); other settings take neither. "
                         "ktlib.runs.plan sets target_run to the full run of the same seed; load_or_train reads it")
    if teacher is not None and teacher.cfg.task != model_cfg.task:
        raise ValueError(f"the teacher's task ({teacher.cfg.task}) differs from the student's ({model_cfg.task})")


def _start(model_cfg: ModelConfig, train_cfg: TrainConfig, audio_source: KTModel | None) -> _Run:
    """A fresh model (seeded), Adam and the learning-rate schedule on the training device."""
    device = pick_device(train_cfg.device)
    set_seed(train_cfg.seed)
    model = KTModel(model_cfg)
    if audio_source is not None:
        load_audio_encoder(model, audio_source)
    model = model.to(device)
    opt = make_optimizer(model, train_cfg.lr)
    sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=train_cfg.plateau_patience,
                                                        factor=train_cfg.plateau_factor)
             if train_cfg.schedule == "plateau" else None)
    return _Run(model, opt, sched, device, amp=train_cfg.amp and device.type == "cuda")


def _resume(run: _Run, path: Path) -> None:
    """Continue from the checkpoint of the last finished epoch (model, optimiser, schedule, random state)."""
    state = load_state(path, map_location=run.device)
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    if run.sched is not None:
        run.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"].cpu())
    if state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.history, run.start_epoch, run.seconds = state["history"], state["epoch"] + 1, state["seconds"]
    run.resumed = [*state.get("resumed_at", []), run.start_epoch]
    run.best = {"loss": state["best_loss"], "epoch": state["best_epoch"], "state": state["best_model"]}


def _checkpoint(run: _Run, path: Path, epoch: int) -> None:
    save_state(path, {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                      "scheduler": run.sched.state_dict() if run.sched is not None else {},
                      "rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
                      "history": run.history, "epoch": epoch, "seconds": run.seconds, "resumed_at": run.resumed,
                      "best_loss": run.best["loss"], "best_epoch": run.best["epoch"], "best_model": run.best["state"]})
    _kill_hook(path)


def _train_step(run: _Run, batch: dict, inputs: dict, train_cfg: TrainConfig, teacher: KTModel | None) -> dict:
    """One optimiser step on ``inputs`` (``batch`` narrowed); the batch's losses (tensors) by name."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
        out, details = run.model(inputs, return_details=True, skip_padding=True)
        task = task_loss(out, inputs["y"], run.model.cfg.task)
        loss, cons = run.model.paper_loss(task, details)
        dist = torch.zeros((), device=run.device)
        if teacher is not None:  # the teacher sees the complete batch
            with torch.no_grad():
                t_out, t_details = teacher(_to(batch, run.device), return_details=True, skip_padding=True)
            dist = distillation_loss(out, details["pooled"], t_out, t_details["pooled"], train_cfg)
        loss = loss + dist
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), train_cfg.clip)
    run.opt.step()
    return {"loss": loss, "task": task, "consistency": cons, "distill": dist}


def _train_epoch(run: _Run, data: MultimodalData, train_cfg: TrainConfig, epoch: int,
                 teacher: KTModel | None) -> dict[str, float]:
    """One pass over the training split; the mean of each loss."""
    run.model.train()
    protocol = train_cfg.protocol
    # The shuffling order depends only on (seed, epoch), so a resumed run sees the same batches.
    loader = make_loader(data, "train", train_cfg.batch_size, shuffle=True,
                         missing=SETTING_TABLE[run.model.cfg.setting].absent_in_training,
                         seed=train_cfg.seed * 1000 + epoch)
    allowed = train_allowed(train_cfg, len(data["train"]), epoch)
    sums = {"loss": 0.0, "task": 0.0, "consistency": 0.0, "distill": 0.0}
    n = 0
    for batch in loader:
        inputs = batch if allowed is None else dict(batch, allowed=torch.from_numpy(allowed[batch["index"].numpy()]))
        if frames_dropped(protocol, "train"):  # frame-level missing in a train_test protocol
            inputs = protocol.apply_batch(inputs, "train", epoch)[0]
        inputs = _to(inputs, run.device)
        losses = _train_step(run, batch, inputs, train_cfg, teacher)
        b = len(inputs["y"])
        n += b
        for k, v in losses.items():
            sums[k] += v.item() * b
    return {k: v / max(n, 1) for k, v in sums.items()}


def _record_epoch(run: _Run, epoch: int, train_losses: dict, valid_loss: float, valid_metrics: dict) -> dict:
    """Append the epoch's history row and keep the model if its validation loss is the best so far."""
    row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_losses.items()}, "valid_loss": valid_loss,
           **{f"valid_{k}": v for k, v in valid_metrics.items()}, "lr": run.opt.param_groups[0]["lr"],
           "seconds": run.seconds}
    run.history.append(row)
    if valid_loss < run.best["loss"]:
        run.best = {"loss": valid_loss, "epoch": epoch,
                    "state": {k: v.detach().clone().cpu() for k, v in run.model.state_dict().items()}}
    return row


def _final_metrics(run: _Run, data: MultimodalData, loaders: dict, protocol: Protocol | None) -> dict:
    """The best model's validation and test scores, and how the run went."""
    run.model.load_state_dict(run.best["state"])
    result = {}
    for split in ("valid", "test"):
        loss, metrics, _ = evaluate(run.model, loaders[split], run.device, run.amp, protocol, split)
        result[split] = {"loss": loss, **metrics}
    return {**result, "best_epoch": run.best["epoch"], "epochs_run": len(run.history), "resumed_at": run.resumed,
            "seconds": run.seconds, "device": str(run.device), "synthetic": data.synthetic}


def fit(model_cfg: ModelConfig, train_cfg: TrainConfig, data: MultimodalData, run_dir: str | Path | None = None,
        progress: bool = True, teacher: KTModel | None = None, audio_source: KTModel | None = None) -> FitResult:
    """Train one model; with ``run_dir``, checkpoint every epoch there and resume from it if a run was cut short.

    ``teacher``: the trained model named by ``train_cfg.teacher``, for distillation; ``audio_source``: the trained
    model named by ``train_cfg.target_run``, whose audio projection gives kt's consistency target
    (``kt_target="run"``).  :func:`ktlib.runs.load_or_train` reads both from the store.
    """
    _check_fit_inputs(model_cfg, train_cfg, teacher, audio_source)
    run = _start(model_cfg, train_cfg, audio_source)
    loaders = {split: eval_loader(data, split, train_cfg.batch_size, model_cfg.setting, train_cfg.protocol)
               for split in ("valid", "test")}
    if teacher is not None:
        teacher = teacher.to(run.device).eval().requires_grad_(False)
    last_path = Path(run_dir) / "last.pt" if run_dir is not None else None
    if last_path is not None:
        last_path.parent.mkdir(parents=True, exist_ok=True)
        if last_path.exists():
            _resume(run, last_path)

    from tqdm.auto import tqdm

    bar = tqdm(range(run.start_epoch, train_cfg.epochs), initial=run.start_epoch, total=train_cfg.epochs,
               desc=f"{model_cfg.setting} seed {train_cfg.seed}", disable=not progress, leave=False)
    key = M.headline_metric(model_cfg.task)
    for epoch in bar:
        t0 = time.perf_counter()
        train_losses = _train_epoch(run, data, train_cfg, epoch, teacher)
        valid_loss, valid_metrics, _ = evaluate(run.model, loaders["valid"], run.device, run.amp,
                                                train_cfg.protocol, "valid")
        if run.sched is not None:
            run.sched.step(valid_loss)
        run.seconds += time.perf_counter() - t0
        row = _record_epoch(run, epoch, train_losses, valid_loss, valid_metrics)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", valid=f"{valid_loss:.3f}",
                        **{key: f"{row[f'valid_{key}']:.3f}"})
        if last_path is not None:
            _checkpoint(run, last_path, epoch)
        if train_cfg.early_stop and run.stale >= train_cfg.early_stop:
            break
    bar.close()
    return FitResult(model=run.model.cpu(), history=run.history,
                     metrics=_final_metrics(run, data, loaders, train_cfg.protocol))
