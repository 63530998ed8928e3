"""Data shipped inside the package: the bundled CIFAR-10 probe set (``--dataset cifar10-probe``).

``cifar10_test_probe.npz`` holds 1,000 CIFAR-10 test images (100 per class) so the main job
runs on a fresh machine with no dataset download and no data root. Each image keeps its
canonical sample ID (its index in the sorted image-folder order of the full 10,000-image test
split: sorted class, then sorted file name), so stores extracted from it line up with stores
extracted from the full set. The pixels are those of the JPEG re-encoding of the test batch
that our machines hold, decoded exactly as :func:`repsim.data.load_probe_set` decodes the
tree; ``meta`` in the file records the source, the selection rule and the IDs' digest.
It is rebuilt by ``python -m repsim.assets.build_probe --source DIR``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from repsim.errors import UserError

PROBE_NAME = "cifar10-probe"
PROBE_FILE = Path(__file__).resolve().parent / "cifar10_test_probe.npz"
CIFAR10_TEST_SIZE = 10_000


@functools.lru_cache(maxsize=1)
def _bundle() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], dict, str]:
    """(images (1000, 32, 32, 3) uint8, labels, ids, classes, meta, file sha256), read once."""
    if not PROBE_FILE.is_file():
        raise UserError(f"the bundled probe set {PROBE_FILE} is missing from this install; "
                        "reinstall repsim (pip install -e .), or use --dataset cifar10 with "
                        "--data-root DIR")
    raw = PROBE_FILE.read_bytes()
    with np.load(PROBE_FILE, allow_pickle=False) as z:
        images, labels, ids = z["images"], z["labels"].astype(np.int64), z["ids"].astype(np.int64)
        classes = tuple(str(c) for c in z["classes"])
        meta = json.loads(str(z["meta"]))
    return images, labels, ids, classes, meta, hashlib.sha256(raw).hexdigest()


def bundled_info() -> dict:
    """The bundle's own record: source, selection rule, ids digest, file sha256."""
    *_, meta, sha = _bundle()
    return {**meta, "file": PROBE_FILE.name, "file_sha256": sha}


def load_bundled_probe(split: str = "test", n: int | None = None, seed: int = 0,
                       image_size: int | None = None, progress: bool = False):
    """The bundled probe set as a :class:`repsim.data.ProbeSet` (dataset ``cifar10``).

    ``n`` None or 1000 takes every bundled image (``seed`` is then not used and recorded as
    None); a smaller ``n`` takes ``subset_indices(1000, n, seed)`` of them. ``ids`` stay the
    canonical CIFAR-10 test IDs, so ``n_total`` is 10,000 (the split the IDs index).
    """
    from repsim.data import ProbeSet, _stack, subset_indices

    if split != "test":
        raise UserError(f"{PROBE_NAME} bundles test images only, got split {split!r}; use "
                        "--split test, or --dataset cifar10 with a data root for the train split")
    images, labels, ids, classes, meta, sha = _bundle()
    total = len(ids)
    if n is not None and n > total:
        raise UserError(f"n={n} is larger than the {total} images bundled as {PROBE_NAME}; "
                        f"pass n <= {total}, or use --dataset cifar10 --data-root DIR (or "
                        "online) for more")
    pos = subset_indices(total, n, seed)
    out = images[pos]
    if image_size is not None and out.shape[1:3] != (image_size, image_size):
        from PIL import Image

        out = _stack((Image.fromarray(a) for a in out), len(pos), image_size, progress,
                     PROBE_NAME)
    source = (f"bundled:{PROBE_FILE.name} sha256={sha[:16]} ({meta['n']} CIFAR-10 test images, "
              f"{meta['per_class']} per class, {meta['pixels']})")
    return ProbeSet(dataset="cifar10", split="test", images=np.ascontiguousarray(out),
                    labels=labels[pos], ids=ids[pos], classes=classes, source=source,
                    seed=None if len(pos) == total else seed, n_total=CIFAR10_TEST_SIZE)
