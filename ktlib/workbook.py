"""What every notebook does first: check its papermill parameters and load its data.

A notebook's ``parameters`` cell holds flat typed values; the next cell calls :func:`setup`, which validates them
with messages that say what is wrong and what is allowed, loads the data (real MulT file when present and asked
for, the simulator otherwise), sets the plotting theme and returns everything in one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import PROFILES, Profile, profile
from .data import MultimodalData, atomic_write, get_data
from .runs import default_runs_dir
from .simulate import REGIMES
from .specs import ALIGNMENTS, DATASETS, MOSI_UTTERANCE


@dataclass
class Workbook:
    dataset: str
    alignment: str
    profile: Profile
    seeds: list[int]
    data: MultimodalData
    figures: Path
    tables: Path
    workers: int | None = None  # training processes (None: one per CPU core up to 4, one on a GPU)
    scheduler: str | None = None  # a Dask scheduler's address: runs train on that cluster (None: on this machine)

    @property
    def label(self) -> str:
        """A label for titles and tables: dataset, alignment and whether the data is synthetic."""
        return f"{self.data.layout.name} [{self.data.kind}]"

    def save_table(self, table: pd.DataFrame, name: str) -> Path:
        """Write ``tables/name.csv`` (atomically) and return its path.  A table without a ``data`` column gets one
        saying which data it came from ("synthetic (simulator)" or "real")."""
        if "data" not in table.columns:
            table = table.assign(data=self.data.kind)
        path = self.tables / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(table.to_csv(index=False).encode()))
        return path

    def figure(self, fig, name: str) -> None:
        """Save a figure as PNG and PDF in the figures folder."""
        from .plots import save_figure

        save_figure(fig, name, self.figures)


def setup(dataset: str = "mosi", alignment: str = "aligned", profile_name: str = "quick", seeds: int = 3,
          data_path: str = "", source: str = "auto", scale: float = 0.0, figures_dir: str = "figures",
          audio_shared: float = -1.0, tables_dir: str = "", workers: int = 0, regime: str = "default",
          scheduler: str = "") -> Workbook:
    """Validate notebook parameters and load the data.

    ``scale=0``, ``audio_shared<0``, ``tables_dir=""`` (the run store's ``tables/``) and ``workers=0``
    (one training process per CPU core, up to 4; one on a GPU) mean defaults; ``scheduler`` (a Dask scheduler's
    address, e.g. ``tcp://host:8786``) sends the runs to that cluster, ``""`` trains them here.  ``regime`` names
    knob settings of the simulator (:data:`ktlib.simulate.REGIMES`).
    """
    problems = []
    if dataset not in (*DATASETS, MOSI_UTTERANCE.name):
        problems.append(f"dataset={dataset!r}: choose one of {DATASETS}, or {MOSI_UTTERANCE.name!r} (the real "
                        f"utterance-level MOSI file, with source='real' and data_path its folder)")
    if alignment not in ALIGNMENTS:
        problems.append(f"alignment={alignment!r}: choose one of {ALIGNMENTS}")
    if profile_name not in PROFILES:
        problems.append(f"profile={profile_name!r}: choose one of {tuple(PROFILES)}")
    if not (isinstance(seeds, int) and 1 <= seeds <= 20):
        problems.append(f"seeds={seeds!r}: the number of training seeds, an integer from 1 to 20")
    if source not in ("auto", "real", "simulated"):
        problems.append(f"source={source!r}: choose auto, real or simulated")
    if not 0.0 <= scale <= 1.0:
        problems.append(f"scale={scale!r}: a fraction of the published split sizes in (0, 1], or 0 for the profile's")
    if audio_shared > 1.0:
        problems.append(f"audio_shared={audio_shared!r}: in [0, 1], or negative for the default")
    if regime not in REGIMES:
        problems.append(f"regime={regime!r}: choose one of {tuple(REGIMES)}")
    if not (isinstance(workers, int) and 0 <= workers <= 32):
        problems.append(f"workers={workers!r}: training processes, an integer from 1 to 32, or 0 for automatic")
    if not isinstance(scheduler, str):
        problems.append(f"scheduler={scheduler!r}: a Dask scheduler address such as 'tcp://host:8786', or ''")
    elif scheduler:
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            problems.append(f"scheduler={scheduler!r} needs Dask: pip install -e '.[cluster]'")
    if problems:
        raise ValueError("notebook parameters out of range:\n  - " + "\n  - ".join(problems))
    prof = profile(profile_name)
    knobs = {"scale": scale or prof.scale, **REGIMES[regime]}
    if audio_shared >= 0:
        knobs["audio_shared"] = audio_shared
    data = get_data(dataset, alignment, source=source, data_dir=data_path or None, **knobs)
    from .plots import set_theme

    set_theme()
    tables = Path(tables_dir) if tables_dir else default_runs_dir() / "tables"
    return Workbook(dataset, alignment, prof, list(range(1, seeds + 1)), data, Path(figures_dir), tables,
                    workers or None, scheduler or None)


def execute_notebook(notebook: str | Path, output: str | Path, parameters: dict | None = None,
                     timeout: int | None = None) -> None:
    """Run a notebook headlessly with papermill: in its own folder, on the ``python3`` kernel, ``parameters``
    injected after its ``parameters`` cell, each cell stopped after ``timeout`` seconds (None: no limit).

    The kernel talks to papermill over IPC (Unix sockets in the Jupyter runtime folder), not TCP on localhost:
    no other user of the machine can reach it, and ipykernel does not warn "running over TCP without
    encryption" for every notebook (``make reproduce``, the notebook tests).
    """
    import papermill as pm
    from traitlets.config import Config

    pm.execute_notebook(str(notebook), str(output), parameters=parameters or {}, cwd=str(Path(notebook).parent),
                        kernel_name="python3", progress_bar=False, execution_timeout=timeout,
                        config=Config({"KernelManager": {"transport": "ipc"}}))


def ablation_params(ablation_seeds: int, transfer_seeds: int, transfer_targets: str, supervision: str,
                    transfer_regimes: str, controls: str, control_regime: str = "default"):
    """Check the parameters that notebooks 4 and 6 share: the seeds per ablation variant (1 .. 20) and those of
    notebook 4's part 4 (:func:`ktlib.experiments.transfer_params`).  Returns (ablation seed list, part 4's seed
    list, part 4's cells)."""
    from .experiments import transfer_params

    if not (isinstance(ablation_seeds, int) and 1 <= ablation_seeds <= 20):
        raise ValueError(f"ablation_seeds={ablation_seeds!r}: the seeds per ablation variant, an integer from 1 to 20")
    transfer_seed_list, cells = transfer_params(transfer_seeds, transfer_targets, supervision, transfer_regimes,
                                                controls, control_regime)
    return list(range(1, ablation_seeds + 1)), transfer_seed_list, cells
