"""Rebuild the bundled probe set ``repsim/assets/cifar10_test_probe.npz``.

    python -m repsim.assets.build_probe --source /path/to/cifar10/test [--per-class 100]

``--source`` is a CIFAR-10 test image-folder tree (``<class>/<file>``, 10 x 1,000 images),
read by :func:`repsim.data.load_probe_set`, so IDs and pixels are the tree's own; each class
gives ``per_class`` images (:func:`repsim.data.balanced_subset`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np

from repsim.assets import CIFAR10_CLASSES, PROBE_FILE
from repsim.data import balanced_subset, load_probe_set
from repsim.paths import atomic_write, ids_digest


def build(source: Path, out: Path = PROBE_FILE, per_class: int = 100, seed: int = 0,
          pixels: str = "JPEG re-encoding of the CIFAR-10 test batch") -> dict:
    """Write the bundle to ``out`` (atomically) and return its ``meta`` record."""
    tree = load_probe_set(f"imagefolder:{source}", progress=True)  # decoded as every set is
    labels, classes = tree.labels, tree.classes
    if classes != CIFAR10_CLASSES:  # else labels in another sorted order, read as CIFAR-10's
        raise SystemExit(f"{source}: class folders {', '.join(classes)} are not CIFAR-10's "
                         f"{', '.join(CIFAR10_CLASSES)}; rename them")
    if len(classes) != 10 or len(tree) != 10_000 or np.bincount(labels).min() != 1000:
        raise SystemExit(f"{source} has {len(classes)} classes and {len(tree)} images; "
                         "expected the CIFAR-10 test split (10 x 1,000)")
    ids = balanced_subset(labels, per_class / 1000, seed)
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
    np.savez_compressed(buf, images=tree.images[ids], labels=labels[ids], ids=ids,
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
