"""Profiles and the one place where a run's configuration is merged.

A :class:`Profile` (``smoke`` / ``quick`` / ``paper``) is a named bundle: model overrides, training settings and
the simulator's scale.  A run's configuration is built by :meth:`Profile.model_config` and
:meth:`Profile.train_config` (a model without a profile: :func:`model_config`), in one order, later layers winning::

    ModelConfig: a preset (the paper's Table 5 for the dataset)  <  the data's shapes  <  the profile  <  overrides
    TrainConfig: TrainConfig's defaults  <  the profile  <  overrides

(``overrides`` are what a caller asks for: a grid's variant, a control's change, the seed.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import ModelConfig, per_modality
from .specs import Layout, get_layout
from .train import TrainConfig

# The paper's Table 5 per dataset (d=40, 4 layers everywhere); kernels L/A/V.
PAPER_CONFIGS: dict[str, dict] = {
    "mosi": dict(heads=10, text_dropout=0.2, embed_dropout=0.2, out_dropout=0.1, kernels=per_modality(1, 3, 3)),
    "mosei": dict(heads=8, text_dropout=0.3, embed_dropout=0.1, out_dropout=0.1, kernels=per_modality(1, 3, 3)),
    "iemocap": dict(heads=10, text_dropout=0.3, embed_dropout=0.25, out_dropout=0.1, kernels=per_modality(3, 5, 3)),
}
# The official MulT code's defaults (its command-line flags).
MULT_CODE_DEFAULTS: dict = dict(d=30, layers=5, heads=5, kernels=per_modality(1, 1, 1), text_dropout=0.25,
                                embed_dropout=0.25, attn_dropout=per_modality(0.1, 0.0, 0.0), relu_dropout=0.1,
                                res_dropout=0.1, out_dropout=0.0, causal=True)


def model_config(layout: Layout | str, alignment: str = "aligned", preset: str = "paper", **overrides) -> ModelConfig:
    """A configuration for a dataset's shapes, e.g. ``model_config("mosi", "unaligned", setting="kt")``.

    ``preset="paper"``: the paper's Table 5 for that dataset; ``"mult_code"``: the official MulT code defaults.
    ``overrides``: ModelConfig fields, applied last.
    """
    layout = get_layout(layout, alignment) if isinstance(layout, str) else layout
    if preset not in ("paper", "mult_code"):
        raise ValueError(f"preset must be 'paper' or 'mult_code', got {preset!r}")
    base = dict(PAPER_CONFIGS.get(layout.dataset, {}) if preset == "paper" else MULT_CODE_DEFAULTS)
    base.update(feature_dims=dict(layout.feature_dims), seq_lens=dict(layout.seq_lens), task=layout.task)
    base.update(overrides)
    return ModelConfig(**base)


@dataclass(frozen=True)
class Profile:
    """A named bundle: model overrides, training settings and the simulator's scale."""

    name: str
    model: dict = field(default_factory=dict)  # ModelConfig overrides on top of the paper's configuration
    train: dict = field(default_factory=dict)  # TrainConfig fields
    scale: float = 1.0  # fraction of the published split sizes when the data is simulated
    description: str = ""

    def model_config(self, layout: Layout | str, setting: str, **overrides) -> ModelConfig:
        """The model of ``setting`` on ``layout`` under this profile, with ``overrides`` (ModelConfig fields)."""
        return model_config(layout, setting=setting, **{**self.model, **overrides})

    def train_config(self, **overrides) -> TrainConfig:
        """This profile's training settings with ``overrides`` (TrainConfig fields, e.g. ``seed``)."""
        return TrainConfig(**{**self.train, **overrides})


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
