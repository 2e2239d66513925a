"""Training: one ``fit`` for every setting and dataset, on CUDA when present and on the CPU otherwise.

- Task loss per dataset: L1 for MOSI / MOSEI regression, cross-entropy over the four binary emotions of IEMOCAP;
  in setting ``kt`` plus ``lambda1 * L_c(V->A) + lambda2 * L_c(L->A)`` (eq. 6).
- Adam, gradient clipping, ReduceLROnPlateau on the validation loss (MulT) or the paper's constant rate,
  early stopping, and the best model by validation loss.  Mixed precision (bfloat16 autocast) on CUDA.
- Validation and test batches never carry audio in the missing-audio settings: the model is selected and scored
  exactly as it will be used.
- Checkpoints after every epoch hold the model, optimiser, scheduler, random state (CPU and CUDA generators) and
  history, so a run that is killed resumes from its last finished epoch and ends where an uninterrupted run would
  (on the CPU); its metrics list the epochs it resumed at (``resumed_at``, empty for a run never interrupted).
- Profiles (``smoke`` / ``quick`` / ``paper``) are named bundles of model and training settings: see ``PROFILES``.

Missing data beyond the paper (``TrainConfig``)
- ``protocol``: a :class:`ktlib.missing.Protocol`.  Its validation and test masks select and score the model; a
  ``train_test`` protocol also masks the model's training inputs, drawn afresh each epoch.  Training batches are
  read complete and narrowed with a ``keep`` matrix (see :class:`ktlib.model.KTModel`), so the real modalities a
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
from .data import MultimodalData, atomic_write, make_loader, presence_matrix, sha256sum
from .missing import Protocol, narrow, subset_presence
from .model import KTModel, ModelConfig

# Settings whose inputs at test time have no audio; their validation and test batches are built without it.
AUDIO_FREE_AT_TEST = ("kt", "language_vision", "vision_only", "language_only")


@dataclass
class TrainConfig:
    """How to train.  ``TrainConfig.from_profile("quick")`` gives a named bundle."""

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


@dataclass(frozen=True)
class Profile:
    """A named bundle: model overrides, training settings and the simulator's scale."""

    name: str
    model: dict = field(default_factory=dict)  # ModelConfig overrides on top of the paper's configuration
    train: dict = field(default_factory=dict)  # TrainConfig fields
    scale: float = 1.0  # fraction of the published split sizes when the data is simulated
    description: str = ""


_NO_DROPOUT = dict(text_dropout=0.0, embed_dropout=0.0, relu_dropout=0.0, res_dropout=0.0, out_dropout=0.0,
                   attn_dropout={"l": 0.0, "a": 0.0, "v": 0.0})
PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", model=dict(d=8, heads=2, layers=1, mem_layers=1, kt_layers=1, kt_target="run",
                                         **_NO_DROPOUT),
                     train=dict(epochs=2, batch_size=16), scale=0.05,
                     description="seconds: plumbing checks and tests, numbers mean nothing"),
    "quick": Profile("quick", model=dict(d=16, heads=4, layers=1, mem_layers=1, kt_layers=1, kt_target="run"),
                     train=dict(epochs=8, batch_size=48, lr=3e-3), scale=1.0,
                     description="minutes on a 2-core CPU: d=16, one layer per stack, 8 epochs"),
    "paper": Profile("paper", model=dict(kt_target="run"),
                     train=dict(epochs=40, batch_size=128, lr=1e-3, schedule="constant"),
                     scale=1.0, description="the paper's Table 5 configuration and 40 epochs; meant for a GPU"),
}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


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
    present = presence_matrix(n, ("a",) if setting in AUDIO_FREE_AT_TEST else ())
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
            out = model(batch)
        loss = task_loss(out, batch["y"], model.cfg.task)
        total += loss.item() * len(batch["y"])
        count += len(batch["y"])
        preds.append(out.float().cpu().numpy())
        ys.append(batch["y"].cpu().numpy())
    pred, y = np.concatenate(preds), np.concatenate(ys)
    if not np.isfinite(pred).all():
        raise FloatingPointError("the model produced NaN/inf predictions; lower the learning rate or check inputs")
    return total / max(count, 1), M.task_metrics(pred, y, model.cfg.task), pred


class CheckpointError(RuntimeError):
    """A training checkpoint is corrupt, truncated or from another run."""


def save_state(path: Path, state: dict) -> None:
    """Write a checkpoint atomically, with a sha256 beside it so that a damaged file is recognised."""
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(sha256sum(path).encode()))


def load_state(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_state` (``weights_only=True``); refuse a damaged one clearly."""
    sidecar = path.with_name(path.name + ".sha256")
    hint = f"delete {path} (and {sidecar.name}) to start that run afresh, or retrain with force=True"
    if not sidecar.exists():
        raise CheckpointError(f"{path} has no checksum file {sidecar.name}, so it cannot be trusted; {hint}")
    if sha256sum(path) != sidecar.read_text().strip():
        raise CheckpointError(f"{path} does not match its checksum: it is truncated or corrupt; {hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the file cannot be used
        raise CheckpointError(f"{path} could not be read ({type(err).__name__}: {err}); {hint}") from err


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


def train_keep(train_cfg: TrainConfig, n: int, epoch: int) -> np.ndarray | None:
    """(n, 3) bool: the modalities each training sample may use in ``epoch`` (None: all it has).

    A ``train_test`` protocol's fixed or modality-level pattern, narrowed by ``train_drop="subsets"``; fresh
    draws every epoch, reproducible from the seeds.
    """
    keep = None
    protocol = train_cfg.protocol
    if protocol is not None and protocol.applies_to("train") and protocol.kind in ("fixed", "modality"):
        keep = protocol.presence(n, "train", epoch)
    if train_cfg.train_drop == "subsets":
        drop = subset_presence(n, [train_cfg.seed, 7, epoch])
        keep = drop if keep is None else narrow(keep, drop)
    return keep


def distillation_loss(out: torch.Tensor, pooled: torch.Tensor, teacher_out: torch.Tensor,
                      teacher_pooled: torch.Tensor, train_cfg: TrainConfig) -> torch.Tensor:
    """``distill_pred * MSE(prediction, teacher's) + distill_rep * MSE(pooled, teacher's)`` (MITR-DNet style).

    Predictions are compared as they are: regression scores, or IEMOCAP logits.
    """
    return (train_cfg.distill_pred * F.mse_loss(out.float(), teacher_out.float())
            + train_cfg.distill_rep * F.mse_loss(pooled.float(), teacher_pooled.float()))


def fit(model_cfg: ModelConfig, train_cfg: TrainConfig, data: MultimodalData, run_dir: str | Path | None = None,
        progress: bool = True, teacher: KTModel | None = None, audio_source: KTModel | None = None) -> FitResult:
    """Train one model; with ``run_dir``, checkpoint every epoch there and resume from it if a run was cut short.

    ``teacher``: the trained model named by ``train_cfg.teacher``, for distillation; ``audio_source``: the trained
    model named by ``train_cfg.target_run``, whose audio projection gives kt's consistency target
    (``kt_target="run"``).  :func:`ktlib.runs.load_or_train` reads both from the store.
    """
    if bool(train_cfg.teacher) != (teacher is not None):
        raise ValueError(f"train_cfg.teacher={train_cfg.teacher!r} but teacher={'a model' if teacher else None}: "
                         "distillation needs both the run id and the model (load_or_train passes it from the store)")
    wants_source = model_cfg.target_from_run
    if wants_source != bool(train_cfg.target_run) or bool(train_cfg.target_run) != (audio_source is not None):
        raise ValueError(f"kt_target='run' (setting {model_cfg.setting!r}, kt_target {model_cfg.kt_target!r}) needs "
                         f"both train_cfg.target_run (got {train_cfg.target_run!r}) and the finished run's model "
                         f"(got {'a model' if audio_source is not None else None}); other settings take neither. "
                         "ktlib.runs.plan sets target_run to the full run of the same seed; load_or_train reads it")
    device = pick_device(train_cfg.device)
    set_seed(train_cfg.seed)
    model = KTModel(model_cfg)
    if audio_source is not None:
        model.load_audio_encoder(audio_source)
    model = model.to(device)
    opt = make_optimizer(model, train_cfg.lr)
    sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=train_cfg.plateau_patience,
                                                        factor=train_cfg.plateau_factor)
             if train_cfg.schedule == "plateau" else None)
    amp = train_cfg.amp and device.type == "cuda"
    protocol = train_cfg.protocol
    valid_loader = eval_loader(data, "valid", train_cfg.batch_size, model_cfg.setting, protocol)
    test_loader = eval_loader(data, "test", train_cfg.batch_size, model_cfg.setting, protocol)
    # no audio in training where the setting has none; kt reads it for its consistency target only
    train_missing = ("a",) if model_cfg.setting in AUDIO_FREE_AT_TEST and model_cfg.setting != "kt" else ()
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
        if teacher.cfg.task != model_cfg.task:
            raise ValueError(f"the teacher's task ({teacher.cfg.task}) differs from the student's ({model_cfg.task})")

    history: list[dict] = []
    best = {"loss": float("inf"), "epoch": -1, "state": None}
    start_epoch, seconds, resumed = 0, 0.0, []  # resumed: the epochs at which an interrupted run went on
    last_path = Path(run_dir) / "last.pt" if run_dir is not None else None
    if last_path is not None:
        last_path.parent.mkdir(parents=True, exist_ok=True)
        if last_path.exists():
            state = load_state(last_path, map_location=device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"].cpu())
            if state.get("cuda_rng"):
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            history, start_epoch, seconds = state["history"], state["epoch"] + 1, state["seconds"]
            resumed = [*state.get("resumed_at", []), start_epoch]
            best = {"loss": state["best_loss"], "epoch": state["best_epoch"], "state": state["best_model"]}

    from tqdm.auto import tqdm

    bar = tqdm(range(start_epoch, train_cfg.epochs), initial=start_epoch, total=train_cfg.epochs,
               desc=f"{model_cfg.setting} seed {train_cfg.seed}", disable=not progress, leave=False)
    stale = 0 if best["epoch"] < 0 else len(history) - 1 - best["epoch"]
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        # The shuffling order depends only on (seed, epoch), so a resumed run sees the same batches.
        loader = make_loader(data, "train", train_cfg.batch_size, shuffle=True, missing=train_missing,
                             seed=train_cfg.seed * 1000 + epoch)
        keep = train_keep(train_cfg, len(data["train"]), epoch)
        sums = {"loss": 0.0, "task": 0.0, "consistency": 0.0, "distill": 0.0}
        n = 0
        for batch in loader:
            inputs = batch if keep is None else dict(batch, keep=torch.from_numpy(keep[batch["index"].numpy()]))
            if frames_dropped(protocol, "train"):  # frame-level missing in a train_test protocol
                inputs = protocol.apply_batch(inputs, "train", epoch)[0]
            inputs = _to(inputs, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out, details = model(inputs, return_details=True)
                task = task_loss(out, inputs["y"], model_cfg.task)
                cons = model.consistency_term(details)
                dist = torch.zeros((), device=device)
                if teacher is not None:  # the teacher sees the complete batch
                    with torch.no_grad():
                        t_out, t_details = teacher(_to(batch, device), return_details=True)
                    dist = distillation_loss(out, details["pooled"], t_out, t_details["pooled"], train_cfg)
                loss = task + cons + dist
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip)
            opt.step()
            b = len(inputs["y"])
            n += b
            for k, v in (("loss", loss), ("task", task), ("consistency", cons), ("distill", dist)):
                sums[k] += v.item() * b
        valid_loss, valid_metrics, _ = evaluate(model, valid_loader, device, amp, protocol, "valid")
        if sched is not None:
            sched.step(valid_loss)
        seconds += time.perf_counter() - t0
        row = {"epoch": epoch, **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}, "valid_loss": valid_loss,
               **{f"valid_{k}": v for k, v in valid_metrics.items()}, "lr": opt.param_groups[0]["lr"],
               "seconds": seconds}
        history.append(row)
        if valid_loss < best["loss"]:
            best = {"loss": valid_loss, "epoch": epoch,
                    "state": {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}}
            stale = 0
        else:
            stale += 1
        key = "valid_mae" if model_cfg.task == "regression" else "valid_mean_acc"
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", valid=f"{valid_loss:.3f}", **{key[6:]: f"{row[key]:.3f}"})
        if last_path is not None:
            save_state(last_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict() if sched is not None else {},
                                   "rng": torch.get_rng_state(),
                                   "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                                   "history": history, "epoch": epoch, "seconds": seconds, "resumed_at": resumed,
                                   "best_loss": best["loss"], "best_epoch": best["epoch"],
                                   "best_model": best["state"]})
            _kill_hook(last_path)
        if train_cfg.early_stop and stale >= train_cfg.early_stop:
            break
    bar.close()

    model.load_state_dict(best["state"])
    valid_loss, valid_metrics, _ = evaluate(model, valid_loader, device, amp, protocol, "valid")
    test_loss, test_metrics, _ = evaluate(model, test_loader, device, amp, protocol, "test")
    result = {"valid": {"loss": valid_loss, **valid_metrics}, "test": {"loss": test_loss, **test_metrics},
              "best_epoch": best["epoch"], "epochs_run": len(history), "resumed_at": resumed, "seconds": seconds,
              "device": str(device), "synthetic": data.synthetic}
    return FitResult(model=model.cpu(), history=history, metrics=result)
