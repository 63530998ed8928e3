"""Small drawing helpers shared by the attention and feature-map figures.

Maps are ``(h, w)`` float arrays on a coarse grid (patches or feature-map cells); images are
``(H, W, 3)`` uint8. Figures are written atomically (:func:`repsim.paths.atomic_write`) with
their provenance in the PNG's text chunk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from repsim import paths


def save_figure(fig, path: str | os.PathLike, provenance: dict | None = None, dpi: int = 120
                ) -> Path:
    """Save a matplotlib figure as PNG atomically; ``provenance`` goes into its text chunk."""
    import matplotlib.pyplot as plt

    meta = {"Software": "repsim"}
    if provenance is not None:
        meta["Description"] = json.dumps(provenance, default=str)
    try:
        return paths.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi,
                                                          metadata=meta, bbox_inches="tight"))
    finally:
        plt.close(fig)


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` map -> ``(H, W)`` by bilinear interpolation (cell centres aligned), float32."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(grid_map, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear",
                        align_corners=False)
    return out[0, 0].numpy()


def normalise(m: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] for display (a constant map becomes all zeros)."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    return np.zeros_like(m) if hi <= lo else (m - lo) / (hi - lo)


def overlay(ax, image: np.ndarray, grid_map: np.ndarray, alpha: float = 0.55,
            cmap: str = "inferno") -> None:
    """Draw ``image`` with ``grid_map`` (min-max normalised, upsampled) on top of it."""
    ax.imshow(image, interpolation="nearest")
    heat = normalise(upsample(grid_map, image.shape[:2]))
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def bare(ax) -> None:
    """Remove ticks and frame from an image panel."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def pick_images(probe, n_images: int | None, ids, data_root=None, progress: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """(images ``(N, H, W, 3)`` uint8, ids ``(N,)``) to draw: the first ``n_images`` of the
    probe set, or the samples with these ``ids`` (canonical order of the split).

    Ids outside the probe set make the whole split load once (a few seconds for CIFAR; for
    the bundled probe set that needs the full CIFAR-10 data root).
    """
    from repsim.data import load_probe_set
    from repsim.errors import UserError

    if ids:
        ids = np.asarray([int(i) for i in ids], dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= probe.n_total)]
        if len(bad):
            raise UserError(f"--ids {', '.join(map(str, bad[:5]))} out of range; "
                            f"{probe.dataset} {probe.split} has ids 0..{probe.n_total - 1}")
        source = probe
        if not np.isin(ids, probe.ids).all():
            square = probe.images.shape[1] == probe.images.shape[2]
            source = load_probe_set(probe.dataset, probe.split, n=None, data_root=data_root,
                                    image_size=probe.images.shape[1] if square else None,
                                    progress=progress)
        where = {int(v): j for j, v in enumerate(source.ids)}
        missing = [int(i) for i in ids if int(i) not in where]
        if missing:
            raise UserError(f"--ids {', '.join(map(str, missing[:5]))} are not in "
                            f"{source.source}; pass ids it holds")
        return source.images[[where[int(i)] for i in ids]], ids
    n = 4 if n_images is None else int(n_images)
    if not 1 <= n <= len(probe):
        raise UserError(f"--images {n}: the probe set has {len(probe)} images; pass "
                        f"--images between 1 and {len(probe)}")
    return probe.images[:n], np.asarray(probe.ids[:n], dtype=np.int64)


