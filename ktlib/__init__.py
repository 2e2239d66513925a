"""ktlib: the helper package behind the knowledge-transfer workbook.

Data flows one way: real MulT files or the simulator -> ``data`` -> model -> training -> run store -> plots.
"""

import os as _os
import tempfile as _tempfile

# umap-learn compiles with numba, which fails on a read-only install unless its cache has a writable home.
_os.environ.setdefault("NUMBA_CACHE_DIR", _os.path.join(_tempfile.gettempdir(), "ktlib-numba-cache"))

__version__ = "0.1.0"
