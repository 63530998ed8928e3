"""Data shipped inside the package: the bundled CIFAR-10 probe set ``cifar10-probe``.

``cifar10_test_probe.npz``: 1,000 CIFAR-10 test images (100 per class) with their canonical
sample IDs (index in the full test split sorted by class, then file name), so stores from it
line up with stores from the full set; ``meta`` records the source and the selection. Rebuilt
by ``python -m repsim.assets.build_probe --source DIR``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from repsim.errors import UserError

if TYPE_CHECKING:
    import numpy as np

PROBE_NAME = "cifar10-probe"
DEFAULT_DATASET = PROBE_NAME  # every command but `repsim train`: offline, no data root
PROBE_FILE = Path(__file__).resolve().parent / "cifar10_test_probe.npz"


@functools.lru_cache(maxsize=1)
def read_bundle() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], dict, str]:
    """(images (1000, 32, 32, 3) uint8, labels, ids, classes, meta, file sha256), read once;
    :func:`repsim.data.load_probe_set` serves them as ``cifar10-probe``."""
    import numpy as np  # here: naming the default dataset imports nothing

    if not PROBE_FILE.is_file():
        raise UserError(f"the bundled probe set {PROBE_FILE} is missing from this install; "
                        "reinstall repsim (pip install -e .), or use dataset='cifar10' with "
                        "data_root=DIR")
    with np.load(PROBE_FILE, allow_pickle=False) as z:
        images, labels, ids = z["images"], z["labels"].astype(np.int64), z["ids"].astype(np.int64)
        classes = tuple(str(c) for c in z["classes"])
        meta = json.loads(str(z["meta"]))
    sha = hashlib.sha256(PROBE_FILE.read_bytes()).hexdigest()
    return images, labels, ids, classes, meta, sha
