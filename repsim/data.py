"""Probe sets: the fixed, reproducible images whose activations get extracted and compared.

A probe set is ``n`` images of one split, in a canonical order, each carrying a stable
*sample ID* (its index in the canonical order of the full split), so two runs -- or two
models -- can be aligned row by row and a subset can be traced back to its files.

Where data comes from (the data root is ``--data-root``, else ``$REPSIM_DATA``, else
``./data``), checked in this order:

1. an image-folder tree ``<root>/<dataset>/<split>/<class>/*.{jpg,jpeg,png,bmp}``, or
   ``<root>/<split>/<class>/...`` when ``<root>`` itself is named like the dataset.
   Canonical order: sorted class folder names, then sorted file names within a class;
   label = index of the class in the sorted class list.
2. torchvision's own layout under ``<root>`` (``CIFAR10``, ``CIFAR100``, ``SVHN``);
   sample ID = torchvision's dataset index. Downloaded by torchvision when missing and
   ``download=True`` (needs network).

``cifar10-probe`` is the bundled set (:mod:`repsim.assets`): 1,000 CIFAR-10 test images with
their canonical IDs, needing no data root and no network (the default of ``repsim cka`` and
``repsim figures``).

``imagefolder:PATH`` reads the user's own images, ``PATH/<class>/*`` or flat ``PATH/*``
(one class, ``"images"``).

Images come back as ``(n, H, W, 3)`` uint8 RGB. Only the selected files are opened.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from repsim.assets import PROBE_FILE, PROBE_NAME
from repsim.errors import UserError

DATASETS = ("cifar10", "cifar100", "svhn")  # plus "imagefolder:PATH"
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_MIXED_SIZE = 224  # square side used when images differ in size and none was asked for
ENV_DATA_ROOT = "REPSIM_DATA"

# A tree with another class count is some other dataset (or a half-copied one); labels
# would silently disagree with the dataset's standard label order.
_CLASS_COUNTS = {"cifar10": 10, "cifar100": 100, "svhn": 10}
_TORCHVISION_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}
# "cifar10-probe": 1,000 CIFAR-10 test images bundled in the package (repsim.assets).
_VALID_DATASETS = ", ".join(DATASETS) + ", cifar10-probe, imagefolder:PATH"


@dataclass(frozen=True, eq=False)  # eq=False: array fields make value equality ambiguous
class ProbeSet:
    """A reproducible set of probe images.

    ``images`` is ``(n, H, W, 3)`` uint8 RGB; ``labels`` and ``ids`` are ``(n,)`` int64, with
    ``ids`` the sorted indices of the samples in the canonical order of the full split of size
    ``n_total``. ``seed`` is the subset seed, or None when the whole split was taken.
    """

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    classes: tuple[str, ...]
    source: str
    seed: int | None
    n_total: int

    def __len__(self) -> int:
        return len(self.ids)

    def provenance(self) -> dict[str, Any]:
        """JSON-able record of exactly which samples these are.

        ``ids_sha256`` hashes the ids as little-endian int64 bytes, so it is identical across
        machines and numpy versions for the same selection.
        """
        from repsim.paths import ids_digest

        return {
            "dataset": self.dataset,
            "split": self.split,
            "n": int(len(self.ids)),
            "n_total": int(self.n_total),
            "seed": self.seed,
            "source": self.source,
            "ids_sha256": ids_digest(self.ids),
        }


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The data root: ``data_root`` (``--data-root``) if given, else ``$REPSIM_DATA``, else
    ``./data``; returned absolute (not required to exist)."""
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get(ENV_DATA_ROOT) or "data"
    return Path(data_root).expanduser().absolute()


def subset_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Deterministic, sorted ``(k,)`` int64 indices into ``range(n_total)``.

    ``n`` None or ``n >= n_total`` gives ``arange(n_total)``; otherwise ``n`` indices drawn
    without replacement by ``np.random.default_rng(seed)``, then sorted.
    """
    _check_positive(n)
    if n is None or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(n_total, n, replace=False)
    return np.sort(chosen).astype(np.int64)


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded, class-balanced subset for data-scale studies.

    ``labels`` is ``(n,)``. From each class (in sorted label order) take
    ``round(fraction * count_c)`` indices drawn without replacement by one
    ``np.random.default_rng(seed)``; returns the sorted ``(k,)`` int64 indices into ``labels``.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction={fraction} is out of range; it must be in (0, 1], "
                        "e.g. 0.1 for 10% of each class")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"labels have shape {labels.shape}; pass a 1-D array of class labels")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = round(fraction * len(members))
        picked.append(rng.choice(members, k, replace=False))
    out = np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
    if len(out) == 0:
        raise UserError(f"fraction={fraction} selects no samples from {len(labels)} labels; "
                        "use a larger fraction")
    return out.astype(np.int64)


def load_probe_set(
    dataset: str = "cifar10",
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = True,
    progress: bool = False,
) -> ProbeSet:
    """Load ``n`` images (all if None) of ``dataset``/``split``, chosen by ``seed``.

    ``image_size`` (pixels) resizes every image's shorter side to it (bicubic) and centre-crops
    a square. When None, images keep their native size if all selected images share one,
    else they are brought to 224x224 -- so for mixed-size folders pass ``image_size`` to make
    the size independent of which subset was drawn. ``download`` lets torchvision fetch a
    missing standard dataset (needs network); ``progress`` shows a bar while decoding.
    """
    if not isinstance(dataset, str):
        raise UserError(f"dataset {dataset!r} is not a name; use one of {_VALID_DATASETS}")
    if split not in SPLITS:
        raise UserError(f"split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    _check_positive(n)
    if image_size is not None and image_size <= 0:
        raise UserError(f"image_size={image_size} is not a valid size; pass a positive number "
                        "of pixels, e.g. 224, or omit it to keep the native size")

    if dataset.startswith("imagefolder:"):
        raw = dataset[len("imagefolder:"):]
        if not raw:
            raise UserError("dataset 'imagefolder:' has no path; write imagefolder:PATH with "
                            "PATH a folder of images or of class folders of images")
        folder = Path(raw).expanduser().absolute()
        if not folder.is_dir():
            raise UserError(f"image folder {folder} does not exist; pass imagefolder:PATH with "
                            "PATH an existing folder of images or of class folders")
        classes, paths, labels = _scan_user_folder(folder)
        return _from_files(f"imagefolder:{folder}", split, folder, classes, paths, labels,
                           n, seed, image_size, progress)

    name = dataset.lower()
    if name == PROBE_NAME:  # bundled: no data root, no download
        return _load_bundled(split, n, seed, image_size, progress)
    if name not in DATASETS:
        raise UserError(f"dataset {dataset!r} is unknown; use one of {_VALID_DATASETS}")
    root = resolve_data_root(data_root)
    tree = _find_tree(root, name, split)
    if tree is not None:
        classes, paths, labels = _scan_class_tree(tree)
        expected = _CLASS_COUNTS[name]
        if len(classes) != expected:
            raise UserError(f"{tree} has {len(classes)} class folders but {name} has "
                            f"{expected}; point --data-root at a complete {name} tree")
        return _from_files(name, split, tree, classes, paths, labels,
                           n, seed, image_size, progress)
    # REPSIM_OFFLINE=1 skips download attempts (no waiting on unreachable hosts).
    download = download and os.environ.get("REPSIM_OFFLINE", "") not in ("1", "true", "yes")
    return _from_torchvision(name, split, root, n, seed, image_size, download, progress)


# --------------------------------------------------------------------------- the bundled probe set

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


def _load_bundled(split: str = "test", n: int | None = None, seed: int = 0,
                       image_size: int | None = None, progress: bool = False):
    """The bundled probe set as a :class:`ProbeSet` (dataset ``cifar10``).

    ``n`` None or 1000 takes every bundled image (``seed`` is then not used and recorded as
    None); a smaller ``n`` takes ``subset_indices(1000, n, seed)`` of them. ``ids`` stay the
    canonical CIFAR-10 test IDs, so ``n_total`` is 10,000 (the split the IDs index).
    """
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


# --------------------------------------------------------------------------- image-folder trees


def _is_image(entry: os.DirEntry) -> bool:
    return (entry.is_file() and not entry.name.startswith(".")
            and entry.name.lower().endswith(IMAGE_EXTENSIONS))


def _image_names(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if _is_image(e))


def _class_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _find_tree(root: Path, dataset: str, split: str) -> Path | None:
    """The ``<split>`` folder of an image-folder tree for ``dataset`` under ``root``, if any."""
    candidates = [root / dataset / split]
    # Users often point --data-root at the dataset folder itself (".../datasets/cifar10").
    if root.name.lower() == dataset:
        candidates.append(root / split)
    for split_dir in candidates:
        if split_dir.is_dir() and _class_dirs(split_dir):
            return split_dir
    return None


def _scan_class_tree(folder: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """Canonical ``(classes, paths, labels)`` of ``folder/<class>/*``: sorted classes, then
    sorted file names within each class."""
    classes = tuple(_class_dirs(folder))
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        names = _image_names(folder / cls)
        # An empty class would shift nothing but still own a label no sample carries; more
        # often it means an unfinished copy, so say so instead of training on it.
        if not names:
            raise UserError(f"class folder {folder / cls} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths.extend(folder / cls / name for name in names)
        labels.extend([label] * len(names))
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _scan_user_folder(folder: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """``imagefolder:PATH``: class folders if there are any, else flat images (class 'images')."""
    loose = _image_names(folder)
    if _class_dirs(folder):
        if loose:
            raise UserError(f"{folder} holds both class folders and {len(loose)} loose images; "
                            "move the loose images into a class folder, or point at a folder "
                            "with only one kind")
        return _scan_class_tree(folder)
    if not loose:
        raise UserError(f"image folder {folder} is empty: no class folders and no "
                        f"{', '.join(IMAGE_EXTENSIONS)} files; point imagefolder:PATH at "
                        "a folder of images")
    return ("images",), [folder / name for name in loose], np.zeros(len(loose), np.int64)


def _check_positive(n: int | None) -> None:
    if n is not None and n <= 0:
        raise UserError(f"n={n} is not a valid sample count; pass a positive n, or omit it "
                        "to use the whole split")


def _check_n(n: int | None, n_total: int, dataset: str, split: str) -> None:
    if n is not None and n > n_total:
        raise UserError(f"n={n} is larger than {dataset} {split}, which has {n_total} images; "
                        f"pass n <= {n_total}, or omit n to use them all")


def _from_files(dataset: str, split: str, folder: Path, classes: tuple[str, ...],
                paths: list[Path], labels: np.ndarray, n: int | None, seed: int,
                image_size: int | None, progress: bool) -> ProbeSet:
    n_total = len(paths)
    _check_n(n, n_total, dataset, split)
    ids = subset_indices(n_total, n, seed)
    chosen = [paths[i] for i in ids]
    size = image_size if image_size is not None else _uniform_size_or_none(chosen)
    images = _stack(_decode(chosen), len(chosen), size, progress, f"{dataset} {split}")
    return ProbeSet(dataset=dataset, split=split, images=images, labels=labels[ids], ids=ids,
                    classes=classes, source=f"imagefolder:{folder}",
                    seed=None if len(ids) == n_total else seed, n_total=n_total)


def _uniform_size_or_none(paths: list[Path]) -> int | None:
    """None when every image has the same size (keep native), else the default square side.

    Reads only headers: PIL decodes pixels lazily.
    """
    sizes = set()
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.add(im.size)
        except OSError as exc:
            raise UserError(f"cannot read image {p}: {exc}; remove or replace the file") from None
        if len(sizes) > 1:
            return DEFAULT_MIXED_SIZE
    return None


def _open_rgb(p: Path) -> Image.Image:
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise UserError(f"cannot read image {p}: {exc}; remove or replace the file") from None


def _decode(paths: list[Path]) -> Iterator[Image.Image]:
    """RGB images in the order of ``paths``, decoded by a few threads (PIL releases the GIL
    while decoding, so 50,000 CIFAR JPEGs load several times faster than in one thread)."""
    workers = min(8, os.cpu_count() or 1)
    if workers == 1 or len(paths) < 256:
        yield from map(_open_rgb, paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(_open_rgb, paths)


# --------------------------------------------------------------------------- pixels


def _fit_square(img: Image.Image, size: int) -> Image.Image:
    """Bicubic-resize the shorter side to ``size``, then centre-crop ``size x size``."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _stack(images: Iterable[Image.Image], count: int, size: int | None, progress: bool,
           desc: str) -> np.ndarray:
    """``(count, H, W, 3)`` uint8 from RGB images; resized to ``size`` squares unless None."""
    out: np.ndarray | None = None
    for i, img in enumerate(tqdm(images, total=count, desc=desc, unit="img",
                                 disable=not progress)):
        if size is not None:
            img = _fit_square(img, size)
        arr = np.asarray(img, dtype=np.uint8)
        if out is None:
            # Preallocate from the first image so memory is one array, not a list of copies.
            out = np.empty((count, *arr.shape), dtype=np.uint8)
        out[i] = arr
    assert out is not None  # callers never pass an empty selection
    return out


# --------------------------------------------------------------------------- torchvision


def _from_torchvision(name: str, split: str, root: Path, n: int | None, seed: int,
                      image_size: int | None, download: bool, progress: bool) -> ProbeSet:
    # Imported here: torchvision takes seconds to import and only this layout needs it.
    from torchvision import datasets

    cls = getattr(datasets, _TORCHVISION_NAMES[name])
    kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
    try:
        ds = cls(str(root), download=False, **kwargs)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        ds = None
    if ds is None:
        why = "downloading is off"
        if download:
            try:
                ds = cls(str(root), download=True, **kwargs)
            except Exception as exc:  # any network/IO failure means "no data"
                lines = str(exc).strip().splitlines()
                why = f"download failed: {type(exc).__name__}: {lines[0] if lines else ''}"
        if ds is None:
            raise UserError(
                f"no {name} {split} data under data root {root} ({why}); put an image-folder "
                f"tree at {root / name / split}/<class>/*.jpg, or run online so torchvision "
                f"downloads it; choose the root with --data-root DIR or {ENV_DATA_ROOT}=DIR"
                + (" (or use --dataset cifar10-probe: 1,000 bundled test images)"
                   if name == "cifar10" and split == "test" else "")
            )

    if name == "svhn":
        data = np.asarray(ds.data).transpose(0, 2, 3, 1)  # torchvision keeps SVHN as (n, 3, H, W)
        targets = np.asarray(ds.labels)
        classes = tuple(str(d) for d in range(10))
    else:
        data = np.asarray(ds.data)
        targets = np.asarray(ds.targets)
        classes = tuple(ds.classes)
    n_total = len(data)
    _check_n(n, n_total, name, split)
    ids = subset_indices(n_total, n, seed)
    images = np.ascontiguousarray(data[ids], dtype=np.uint8)
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        pil = (Image.fromarray(a) for a in images)
        images = _stack(pil, len(ids), image_size, progress, f"{name} {split}")
    return ProbeSet(dataset=name, split=split, images=images,
                    labels=targets[ids].astype(np.int64), ids=ids, classes=classes,
                    source=f"torchvision:{root}", seed=None if len(ids) == n_total else seed,
                    n_total=n_total)
