"""Shared test fixtures: the real MOSI utterance-level file (skipped with a reason when absent) and small data."""

import os
import tempfile
from pathlib import Path

import pytest

# umap-learn compiles with numba, which needs a writable cache even where the install is read-only.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "ktlib-numba-cache"))
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_NAME = "mosi_poria2017_utt_stdsplit.pkl"


def _fixture_candidates():
    env = os.environ.get("KTLIB_MOSI_FIXTURE")
    if env:
        yield Path(env)
    yield ROOT / "data" / FIXTURE_NAME
    for folder in ROOT.parents:  # a checkout that sits beside a shared/ data folder
        yield folder / "shared" / "data" / "mosi_utterance" / FIXTURE_NAME


@pytest.fixture(scope="session")
def mosi_fixture_path() -> Path:
    """The real CMU-MOSI utterance-level file; tests that need it skip when it is not on this machine."""
    for path in _fixture_candidates():
        if path.is_file():
            return path
    pytest.skip(f"real MOSI fixture {FIXTURE_NAME} not found (set KTLIB_MOSI_FIXTURE to its path)")


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory) -> Path:
    """A private simulator cache folder, so tests never touch the user's data/sim."""
    return tmp_path_factory.mktemp("sim-cache")


@pytest.fixture(scope="session")
def mosi(tmp_path_factory):
    """A small simulated MOSI (aligned, 3% of the published splits) shared by the training tests."""
    from ktlib.data import load_simulated
    from ktlib.simulate import preset

    return load_simulated(preset("mosi", "aligned", scale=0.03), cache_dir=tmp_path_factory.mktemp("sim"))
