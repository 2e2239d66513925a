"""The installed environment can do what the workbook needs (umap with numba's cache, headless plotting)."""

import os

import numpy as np

from ktlib.analysis import import_umap


def test_numba_cache_dir_is_set_and_writable():
    import_umap()  # sets a default when the user has not

    path = os.environ["NUMBA_CACHE_DIR"]
    os.makedirs(path, exist_ok=True)
    assert os.access(path, os.W_OK), f"NUMBA_CACHE_DIR={path} is not writable"


def test_umap_embeds_two_separated_clusters():
    umap = import_umap()
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (40, 8)), rng.normal(8, 1, (40, 8))]
    emb = umap.UMAP(n_neighbors=10, random_state=0, n_epochs=50).fit_transform(x)
    assert emb.shape == (80, 2)
    gap = np.linalg.norm(emb[:40].mean(0) - emb[40:].mean(0))
    spread = max(emb[:40].std(0).max(), emb[40:].std(0).max())
    assert gap > 3 * spread, "the two clusters should stay apart in the embedding"
