"""Checkpoint files: a finished model (config + state_dict + metrics) and a training run's resumable state.

Both are read with ``torch.load(weights_only=True)``: plain types and tensors only, never a pickled object.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import atomic_write, sha256sum
from .model import KTModel, ModelConfig


def save_checkpoint(path, model: KTModel, metrics: dict | None = None, extra: dict | None = None) -> None:
    """Write ``{config, state_dict, metrics, extra}`` (plain types and tensors only) atomically."""
    payload = {"config": model.cfg.to_dict(), "state_dict": model.state_dict(), "metrics": dict(metrics or {}),
               "extra": dict(extra or {})}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu") -> tuple[KTModel, dict]:
    """Rebuild the model (in eval mode) from a checkpoint read with ``torch.load(weights_only=True)``."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = KTModel(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


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

