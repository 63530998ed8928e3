"""Probe sets: the fixed, reproducible images whose activations get extracted and compared.

A probe set is ``n`` images of one split, each with a stable *sample ID* (its index in the
canonical order of the full split), so runs and models line up row by row. Sources:
``cifar10-probe`` (1,000 CIFAR-10 test images bundled in :mod:`repsim.assets`); ``cifar10``,
``cifar100``, ``svhn`` under the data root, as an image-folder tree
``<root>/<dataset>/<split>/<class>/*`` (canonical order: class in label order, which for
the dataset's own class names (:data:`CLASS_NAMES`) is theirs, for numbered folders (``7``,
``class7``) by number, otherwise sorted; then sorted file name) or else torchvision's own
layout (ID = its index);
``imagefolder:PATH`` (``PATH/<class>/*`` in sorted order, or flat ``PATH/*``, one class).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from repsim.assets import CLASS_NAMES, DEFAULT_DATASET, PROBE_FILE, PROBE_NAME, read_bundle
from repsim.errors import UserError, finite_real, is_whole
from repsim.paths import ids_digest, offline

DATASETS = ("cifar10", "cifar100", "svhn")  # under the data root
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_MIXED_SIZE = 224  # square side used when images differ in size and none was asked for
ENV_DATA_ROOT = "REPSIM_DATA"
CIFAR10_TEST_SIZE = 10_000

# For messages. A tree whose folders name classes must use its dataset's CLASS_NAMES (any
# case): other names ("plane", "car") sort into another order, so labels would be wrong.
_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}
# A tree with another class count is some other dataset (or a half-copied one); labels
# would silently disagree with the dataset's standard label order.
CLASS_COUNTS = {name: len(names) for name, names in CLASS_NAMES.items()}
_VALID_DATASETS = ", ".join(DATASETS) + f", {PROBE_NAME}, imagefolder:PATH"


@dataclass(frozen=True, eq=False)  # eq=False: array fields make value equality ambiguous
class ProbeSet:
    """``images`` ``(n, H, W, 3)`` uint8 RGB; ``labels``, ``ids`` ``(n,)`` int64, ``ids`` the
    sorted indices into the canonical order of the full split of size ``n_total``; ``seed``
    the subset seed, or None when the whole split was taken."""

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
        """JSON-able record of exactly which samples these are, in row order (``ids_sha256``:
        the ids as little-endian int64, the same on every machine). ``seed`` is None whenever
        every image is taken, whatever seed was passed: the same rows, the same record."""
        return {"dataset": self.dataset, "split": self.split, "n": len(self.ids),
                "n_total": int(self.n_total), "source": self.source,  # seed: np.int64 too
                "seed": None if self.seed is None else int(self.seed),
                "ids_sha256": ids_digest(self.ids)}


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """``data_root`` if given, else ``$REPSIM_DATA``, else ``./data``; absolute, may not exist."""
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get(ENV_DATA_ROOT) or "data"
    return Path(data_root).expanduser().absolute()


def subset_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted ``(k,)`` int64 indices into ``range(n_total)``: all of them when ``n`` is None or
    ``>= n_total``, else ``n`` drawn without replacement by ``np.random.default_rng(seed)``."""
    _check_positive(n)
    if n is None or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    _check_seed(seed)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False)).astype(np.int64)


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded, class-balanced subset for data-scale studies: sorted ``(k,)`` int64 indices into
    the ``(n,)`` ``labels``, ``round(fraction * count_c)`` of each class (in sorted label order)
    drawn without replacement by one ``np.random.default_rng(seed)``."""
    if not (finite_real(fraction) and 0 < fraction <= 1):  # True would pass as 1
        raise UserError(f"fraction={_shown(fraction)} is out of range; it must be in (0, 1], "
                        "e.g. 0.1 for 10% of each class")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"labels have shape {labels.shape}; pass a 1-D array of class labels")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    members = (np.flatnonzero(labels == c) for c in np.unique(labels))
    picked = [rng.choice(m, round(fraction * len(m)), replace=False) for m in members]
    out = np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
    if len(out) == 0:
        raise UserError(f"fraction={fraction} selects no samples from {len(labels)} labels; "
                        "use a larger fraction")
    return out.astype(np.int64)


def load_probe_set(dataset: str = DEFAULT_DATASET, split: str = "test", n: int | None = None,
                   seed: int = 0, data_root: str | os.PathLike | None = None,
                   image_size: int | None = None, download: bool = True,
                   progress: bool = False) -> ProbeSet:
    """``n`` images (all if None) of ``dataset``/``split``, chosen by ``seed``.

    ``image_size`` (pixels): resize the shorter side to it (bicubic), centre-crop a square.
    None keeps the native size when all selected images share one, else 224x224 (so for
    mixed-size folders pass it, or the size depends on the subset drawn). ``download`` lets
    torchvision fetch a missing standard dataset (``REPSIM_OFFLINE=1`` turns it off).
    """
    if not isinstance(dataset, str):
        raise UserError(f"dataset={dataset!r} is not a name; use one of {_VALID_DATASETS}")
    if split not in SPLITS:
        raise UserError(f"split={split!r} is unknown; use one of {', '.join(SPLITS)}")
    _check_positive(n)
    if image_size is not None and not is_whole(image_size):
        raise UserError(f"image_size={_shown(image_size)} is not a valid size; pass a positive "
                        "number of pixels, e.g. 224, or omit it to keep the native size")
    if dataset.startswith("imagefolder:"):
        folder, classes, paths, labels = _scan_user_folder(dataset[len("imagefolder:"):])
        return _from_files(f"imagefolder:{folder}", split, folder, classes, paths, labels,
                           n, seed, image_size, progress)
    name = dataset.lower()
    if name == PROBE_NAME:
        return _load_bundled(split, n, seed, image_size, progress)
    if name not in DATASETS:
        raise UserError(f"dataset={dataset!r} is unknown; use one of {_VALID_DATASETS}")
    root = resolve_data_root(data_root)
    tree = _find_tree(root, name, split)
    if tree is None:
        _check_root(root, name, split)
        download = download and not offline()
        return _from_torchvision(name, split, root, n, seed, image_size, download, progress)
    classes, paths, labels = _scan_class_tree(tree, _tree_classes(tree, name))
    return _from_files(name, split, tree, classes, paths, labels, n, seed, image_size, progress)


def pick_images(probe: ProbeSet, n_images: int | None, ids: Iterable[int] | None,
                data_root: str | os.PathLike | None = None, progress: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """(images ``(N, H, W, 3)`` uint8, ids ``(N,)``) to draw: the first ``n_images`` of the
    probe set, the first image of each class (``n_images=None``), or the samples with these
    ``ids`` (ids outside the probe set load the whole split once)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable | None):  # "17": 1, 7
        raise UserError(f"ids={ids!r} is not a list of sample ids; pass a list, e.g. [0, 5]")
    ids = [] if ids is None else list(ids)  # a list: `not ids` is ambiguous for an array
    if not ids and n_images is None:
        first = np.unique(probe.labels, return_index=True)[1]  # sorted by label
        return probe.images[first], np.asarray(probe.ids[first], dtype=np.int64)
    if not ids:
        if not is_whole(n_images) or n_images > len(probe):  # int(2.5) would draw 2
            raise UserError(f"images={_shown(n_images)}: the probe set has {len(probe)} "
                            f"images; pass 1 <= images <= {len(probe)}")
        return probe.images[:n_images], np.asarray(probe.ids[:n_images], dtype=np.int64)
    odd = ", ".join(str(i) for i in ids if not is_whole(i, 0))  # int(3.7) would draw 3
    if odd:
        raise UserError(f"ids [{odd}]: ids are whole numbers >= 0; pass sample ids")
    ids = np.asarray(ids, dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= probe.n_total)].tolist()
    if bad:
        raise UserError(f"ids={bad[:5]} out of range; {probe.dataset} {probe.split} has ids "
                        f"0..{probe.n_total - 1}")
    source = probe
    if not np.isin(ids, probe.ids).all():
        square = probe.images.shape[1] == probe.images.shape[2]
        source = load_probe_set(probe.dataset, probe.split, n=None, data_root=data_root,
                                image_size=probe.images.shape[1] if square else None,
                                progress=progress)
        _check_same_numbering(probe, source)
    where = {int(v): j for j, v in enumerate(source.ids)}  # every id: checked in range above
    return source.images[[where[int(i)] for i in ids]], ids


def _check_same_numbering(probe: ProbeSet, split: ProbeSet) -> None:
    """UserError unless the whole ``split`` holds ``probe``'s images and labels at its ids
    (torchvision numbers CIFAR-10 in batch order, a tree and the bundle in sorted order)."""
    same = split.n_total == probe.n_total and np.array_equal(split.labels[probe.ids], probe.labels)
    if same and split.images.shape[1:] == probe.images.shape[1:]:  # else resized: no pixels
        same = np.array_equal(split.images[probe.ids], probe.images)
    if not same:
        raise UserError(f"{probe.source} and {split.source} number the images differently; "
                        f"pass ids the probe set holds, or point data_root=DIR at its source")


def _check_seed(seed: Any) -> None:
    # numpy's generators take seeds >= 0 only, and None would draw from OS entropy
    if not is_whole(seed, 0):
        raise UserError(f"seed={_shown(seed)} is not valid; pass a seed >= 0, e.g. seed=0")


def _shown(v: Any) -> str:
    return str(v) if isinstance(v, (int, float, np.number)) else repr(v)  # n='5' shows quotes


def _check_positive(n: int | None) -> None:
    if n is not None and not is_whole(n):
        raise UserError(f"n={_shown(n)} is not a valid sample count; pass a positive n, or "
                        "omit it to use the whole split")


def _subset(n_total: int, n: int | None, seed: int, what: str) -> np.ndarray:
    """:func:`subset_indices`, refusing an ``n`` above ``n_total`` (the size of ``what``)."""
    if n is not None and n > n_total:
        raise UserError(f"n={n} is larger than {what}, which has {n_total} images; "
                        f"pass n <= {n_total}, or omit n to use them all")
    return subset_indices(n_total, n, seed)


def bundled_info() -> dict:
    """The bundle's own record: source, selection rule, ids digest, file sha256."""
    *_, meta, sha = read_bundle()
    return {**meta, "file": PROBE_FILE.name, "file_sha256": sha}


def _load_bundled(split: str, n: int | None, seed: int, image_size: int | None,
                  progress: bool) -> ProbeSet:
    """The bundle as a ``cifar10`` test :class:`ProbeSet` (``n`` of its images by ``seed``);
    ``ids`` stay the canonical CIFAR-10 test IDs, so ``n_total`` is 10,000."""
    if split != "test":
        raise UserError(f"{PROBE_NAME} bundles test images only, got split={split!r}; use "
                        "split='test', or dataset='cifar10' with data_root=DIR for train images")
    images, labels, ids, classes, meta, sha = read_bundle()
    if n is not None and n > len(ids):
        raise UserError(f"n={n} is larger than the {len(ids)} images bundled as {PROBE_NAME}; "
                        f"pass n <= {len(ids)}, or dataset='cifar10' with data_root=DIR for more")
    pos = subset_indices(len(ids), n, seed)
    source = (f"bundled:{PROBE_FILE.name} sha256={sha[:16]} ({meta['n']} CIFAR-10 test images, "
              f"{meta['per_class']} per class, {meta['pixels']})")
    return ProbeSet("cifar10", "test", _resized(images[pos], image_size, progress, PROBE_NAME),
                    labels[pos], ids[pos], classes, source,
                    None if len(pos) == len(ids) else seed, CIFAR10_TEST_SIZE)


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted sub-folder names, sorted image file names) of ``folder``, hidden ones skipped."""
    with os.scandir(folder) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    return (sorted(e.name for e in entries if e.is_dir()),
            sorted(e.name for e in entries
                   if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)))


def _find_tree(root: Path, dataset: str, split: str) -> Path | None:
    """The ``<split>`` folder of an image-folder tree for ``dataset`` under ``root``, if any."""
    candidates = [root / dataset / split]
    if root.name.lower() == dataset:  # users often point the root at the dataset folder itself
        candidates.append(root / split)
    return next((d for d in candidates if d.is_dir() and _listing(d)[0]), None)


def _tree_classes(tree: Path, name: str) -> tuple[str, ...]:
    """The class folders of ``tree`` (a ``name`` split) in label order: by number where all are
    the numbers 0..N-1 after one prefix (``0``..``99``, ``class0``..``class99``), else
    :func:`_named_classes`; UserError for a wrong count or other numbers."""
    classes = tuple(_listing(tree)[0])
    if len(classes) != CLASS_COUNTS[name]:
        raise UserError(f"{tree} has {len(classes)} class folders but {name} has "
                        f"{CLASS_COUNTS[name]}; point data_root=DIR at a complete {name} tree")
    found = [re.fullmatch(r"(.*?)([0-9]+)", c) for c in classes]  # 7, class7: one prefix
    if not all(found) or len({m[1] for m in found}) != 1:
        return _named_classes(tree, name, classes)
    numbers = sorted(int(m[2]) for m in found)  # as text, 10 would precede 2
    if numbers != list(range(len(classes))):  # 1..10: SVHN's files number the digit 0 10
        raise UserError(f"{tree}: class folders numbered {numbers[0]}..{numbers[-1]} are not "
                        f"{name}'s labels 0..{len(classes) - 1}; rename them, one per label")
    return tuple(m[0] for m in sorted(found, key=lambda m: int(m[2])))


def _named_classes(tree: Path, name: str, classes: tuple[str, ...]) -> tuple[str, ...]:
    """``classes`` in the order of ``name``'s own class names (any case); sorted, with a
    warning, where none is one of them; UserError for a mix (its labels would be guessed)."""
    known, title = CLASS_NAMES[name], _TITLES[name]
    shown = ", ".join(known) if len(known) <= 10 else f"{', '.join(known[:3])}, ..., {known[-1]}"
    if not any(c.lower() in known for c in classes):  # another dataset, or made up
        warnings.warn(f"{tree}: class folders {', '.join(classes[:3])}, ... name no {title} "
                      f"class, so they are labelled in sorted order ({classes[0]} 0, "
                      f"{classes[1]} 1, ...), not as {title} models label; rename them "
                      f"{shown} for {title}'s labels, or load "
                      f"dataset='imagefolder:{tree}' where sorted order is meant", stacklevel=3)
        return classes
    foreign = [c for c in classes if c.lower() not in known]
    if len({c.lower() for c in classes}) != len(classes):  # "Cat" and "cat": one is missing
        foreign = [c for c in classes if c != c.lower()]
    if foreign:
        raise UserError(f"{tree}: class folders {', '.join(foreign)} are not {title} class "
                        f"names, so their labels would be guessed; rename the {len(known)} "
                        f"folders {shown} (labels 0..{len(known) - 1} in that order)")
    return tuple(sorted(classes, key=lambda c: known.index(c.lower())))


def _check_root(root: Path, dataset: str, split: str) -> None:
    """UserError for a data root torchvision cannot use either: a file (an archive not yet
    unpacked), or a split or class folder of a ``dataset`` tree (it would download there)."""
    if root.is_file():
        raise UserError(f"data root {root} is a file, not a folder; unpack it (tar xJf FILE -C "
                        f"DIR) and pass data_root=DIR, the folder that holds {dataset}/{split}")
    for above in list(root.parents)[1:3]:  # root is <above>/<dataset>/<split>[/<class>]
        inside = any(root.is_relative_to(above / dataset / s) for s in SPLITS)
        if inside and _find_tree(above, dataset, split):
            raise UserError(f"data root {root} is inside the {dataset} tree at {above / dataset}"
                            f"; pass data_root={above}, the folder that holds {dataset}/{split}")


def _scan_class_tree(folder: Path, classes: tuple[str, ...] | None = None
                     ) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """Canonical ``(classes, paths, labels)`` of ``folder/<class>/*``: ``classes`` in label
    order (default: the sorted folder names), then sorted file names within each class."""
    classes = tuple(_listing(folder)[0]) if classes is None else classes
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        names = _listing(folder / cls)[1]
        # An empty class would own a label no sample carries; more often it means an
        # unfinished copy, so say so instead of training on it.
        if not names:
            raise UserError(f"class folder {folder / cls} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths.extend(folder / cls / name for name in names)
        labels.extend([label] * len(names))
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _scan_user_folder(raw: str) -> tuple[Path, tuple[str, ...], list[Path], np.ndarray]:
    """``imagefolder:PATH`` -> ``(folder, classes, paths, labels)``: class folders if there are
    any, else flat images (one class, ``"images"``)."""
    if not raw:
        raise UserError("dataset='imagefolder:' has no path; write imagefolder:PATH with PATH "
                        "a folder of images or of class folders of images")
    folder = Path(raw).expanduser().absolute()
    if folder.is_file():
        raise UserError(f"image folder {folder} is a file, not a folder; pass imagefolder:PATH "
                        "with PATH its folder, or a folder of class folders")
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass imagefolder:PATH with "
                        "PATH an existing folder of images or of class folders")
    dirs, loose = _listing(folder)
    if dirs:
        if loose:
            raise UserError(f"{folder} holds both class folders and {len(loose)} loose images; "
                            "move the loose images into a class folder, or point at a folder "
                            "with only one kind")
        return (folder, *_scan_class_tree(folder))
    if not loose:
        raise UserError(f"image folder {folder} is empty: no class folders and no "
                        f"{', '.join(IMAGE_EXTENSIONS)} files; point imagefolder:PATH at "
                        "a folder of images")
    return folder, ("images",), [folder / n for n in loose], np.zeros(len(loose), np.int64)


def _from_files(dataset: str, split: str, folder: Path, classes: tuple[str, ...],
                paths: list[Path], labels: np.ndarray, n: int | None, seed: int,
                image_size: int | None, progress: bool) -> ProbeSet:
    desc = f"{dataset} {split}"
    ids = _subset(len(paths), n, seed, desc)
    chosen = [paths[i] for i in ids]
    images = _stack(_decode(chosen), len(chosen), image_size, progress, desc)
    if images is None:  # sizes differ and none was asked for: decode again, as squares
        images = _stack(_decode(chosen), len(chosen), DEFAULT_MIXED_SIZE, progress, desc)
    return ProbeSet(dataset, split, images, labels[ids], ids, classes, f"imagefolder:{folder}",
                    None if len(ids) == len(paths) else seed, len(paths))


def _read_rgb(p: Path) -> np.ndarray:
    """The pixels of PIL's ``convert("RGB")`` of image file ``p``; UserError if unreadable."""
    try:
        with Image.open(p) as im:
            if im.mode.startswith("I"):  # 16-bit grey: convert("RGB") would clip it at 255
                grey = (np.clip(np.asarray(im), 0, 65535) >> 8).astype(np.uint8)  # high byte
                return np.repeat(grey[..., None], 3, axis=-1)  # as PIL reads 16-bit RGB
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise UserError(f"cannot read image {p}: {exc}; remove or replace the file") from None


DECODE_BATCH = 512  # files per decoding call: bounded memory, a steady progress bar


def _decode(paths: list[Path]) -> Iterator[np.ndarray]:
    """``(H, W, 3)`` uint8 arrays in the order of ``paths``: the pixels of PIL's
    ``convert("RGB")``. JPEG batches go through torchvision's batched libjpeg-turbo decoder
    (10,000 CIFAR-10 JPEGs: 0.6 s against PIL's 2.1 s; the same pixels, checked on each
    batch's first image); a batch with anything else (PNG, CMYK, a broken file), PIL's."""
    for a in range(0, len(paths), DECODE_BATCH):
        batch = paths[a:a + DECODE_BATCH]
        yield from _decode_jpegs(batch) or _decode_pil(batch)


def _decode_pil(paths: list[Path]) -> list[np.ndarray]:
    """PIL, in a few threads (it releases the GIL while decoding)."""
    workers = min(8, os.cpu_count() or 1)
    if workers == 1 or len(paths) < 256:
        return list(map(_read_rgb, paths))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_read_rgb, paths))


def _decode_jpegs(paths: list[Path]) -> list[np.ndarray] | None:
    """torchvision's batched JPEG decoder, or None where it cannot give PIL's pixels."""
    if not all(p.suffix.lower() in (".jpg", ".jpeg") for p in paths):
        return None
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision 0.29 deprecates its decoders; PIL once they are gone
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg([torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                               for p in paths], mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, OSError, ValueError):  # not a JPEG after all, or damaged: PIL says
        return None
    if any(x.shape[0] not in (1, 3) for x in out):  # CMYK: PIL converts it its own way
        return None
    arrays = [x.expand(3, -1, -1).permute(1, 2, 0).numpy() for x in out]
    return arrays if np.array_equal(arrays[0], _decode_pil(paths[:1])[0]) else None


def _fit_square(img: Image.Image, size: int) -> Image.Image:
    """Bicubic-resize the shorter side to ``size``, then centre-crop ``size x size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _stack(images: Iterable[np.ndarray], count: int, size: int | None, progress: bool,
           desc: str) -> np.ndarray | None:
    """``(count, H, W, 3)`` uint8 from ``count >= 1`` RGB arrays, ``size`` squares unless
    None; None when ``size`` is None and the images differ in size."""
    out = None
    for i, arr in enumerate(tqdm(images, total=count, desc=desc, unit="img",
                                 disable=not progress)):
        if size is not None and arr.shape[:2] != (size, size):
            arr = np.asarray(_fit_square(Image.fromarray(arr), size))
        if out is None:  # preallocated from the first image: one array, not a list of copies
            out = np.empty((count, *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            return None
        out[i] = arr
    return out


def _resized(images: np.ndarray, size: int | None, progress: bool, desc: str) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 as ``size`` squares (unless None or already so), contiguous."""
    if size is None or images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images, dtype=np.uint8)
    return _stack(images, len(images), size, progress, desc)


def _from_torchvision(name: str, split: str, root: Path, n: int | None, seed: int,
                      image_size: int | None, download: bool, progress: bool) -> ProbeSet:
    from torchvision import datasets  # takes seconds to import; only this layout needs it

    cls = getattr(datasets, name.upper())  # CIFAR10, CIFAR100, SVHN
    kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
    try:
        ds = cls(str(root), download=False, **kwargs)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        ds, why = None, "downloading is off"
        if download:
            try:
                ds = cls(str(root), download=True, **kwargs)
            except Exception as exc:  # any network/IO failure means "no data"
                first = (str(exc).strip().splitlines() or [""])[0]
                why = f"download failed: {type(exc).__name__}: {first}"
        if ds is None:
            raise UserError(
                f"no {name} {split} data under data root {root} ({why}); put an image-folder "
                f"tree at {root / name / split}/<class>/*.jpg, or run online so torchvision "
                f"downloads it; choose the root with data_root=DIR or {ENV_DATA_ROOT}=DIR"
                + (f" (or use dataset='{PROBE_NAME}': 1,000 bundled test images)"
                   if name == "cifar10" and split == "test" else "")) from None
    if name == "svhn":  # torchvision keeps SVHN as (n, 3, H, W)
        data, targets = np.asarray(ds.data).transpose(0, 2, 3, 1), np.asarray(ds.labels)
        classes = tuple(str(d) for d in range(10))
    else:
        data, targets, classes = np.asarray(ds.data), np.asarray(ds.targets), tuple(ds.classes)
    ids = _subset(len(data), n, seed, f"{name} {split}")
    images = _resized(data[ids], image_size, progress, f"{name} {split}")
    return ProbeSet(name, split, images, targets[ids].astype(np.int64), ids, classes,
                    f"torchvision:{root}", None if len(ids) == len(data) else seed, len(data))
