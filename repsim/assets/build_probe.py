"""Rebuild the bundled probe set ``repsim/assets/cifar10_test_probe.npz``.

    python -m repsim.assets.build_probe --source /path/to/cifar10/test [--per-class 100]

``--source`` is a CIFAR-10 test image-folder tree (``<class>/<file>``, 10 classes x 1,000
images). From each class (sorted names) ``per_class`` files are drawn without replacement by
one ``numpy.random.default_rng(seed)`` and sorted; a sample's ID is its index in the tree's
canonical order (sorted class, then sorted file name), exactly as :mod:`repsim.data` numbers
it. Images are decoded with PIL as :func:`repsim.data.load_probe_set` decodes them, so a
store extracted from the bundle equals one extracted from the same IDs of the tree.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np

from repsim.assets import PROBE_FILE
from repsim.data import load_probe_set
from repsim.paths import atomic_write, ids_digest


def build(source: Path, out: Path = PROBE_FILE, per_class: int = 100, seed: int = 0,
          pixels: str = "JPEG re-encoding of the CIFAR-10 test batch") -> dict:
    """Write the bundle to ``out`` (atomically) and return its ``meta`` record."""
    tree = load_probe_set(f"imagefolder:{source}", progress=True)  # decoded as every set is
    labels = tree.labels
    if len(tree.classes) != 10 or len(tree) != 10_000:
        raise SystemExit(f"{source} has {len(tree.classes)} classes and {len(tree)} images; "
                         "expected the CIFAR-10 test split (10 x 1,000)")
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(len(tree.classes)):
        members = np.flatnonzero(labels == c)
        picked.append(np.sort(rng.choice(members, per_class, replace=False)))
    ids = np.concatenate(picked).astype(np.int64)  # class-major, so already sorted
    images, classes = tree.images[ids], tree.classes
    meta = {
        "dataset": "cifar10", "split": "test", "n": int(len(ids)), "per_class": per_class,
        "seed": seed, "pixels": pixels,
        "selection": "per class (sorted names): rng=numpy.random.default_rng(seed) draws "
                     "per_class indices without replacement, sorted",
        "id_order": "index in the full test split sorted by class folder, then file name",
        "ids_sha256": ids_digest(ids),
        "source_files": f"{Path(source).name}/<class>/<file> ({len(tree)} files)",
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, labels=labels[ids], ids=ids,
                        classes=np.array(classes), meta=np.array(json.dumps(meta)))
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="CIFAR-10 test image-folder tree")
    p.add_argument("--out", default=str(PROBE_FILE))
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    meta = build(Path(a.source), Path(a.out), a.per_class, a.seed)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.1f} MB): {meta['n']} images, "
          f"ids sha256 {meta['ids_sha256'][:16]}")


if __name__ == "__main__":
    main()
