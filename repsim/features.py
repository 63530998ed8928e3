"""Feature sets: the ``(n, p)`` matrices that every comparison reads, from any source.

A layer's features are an ``(n, p)`` matrix, one row per sample, rows aligned across all
layers of both networks: a numpy array, a torch tensor on any device, or an h5py dataset
(read in row blocks, so stores larger than memory work). A *feature set* is a sequence, or
a name -> matrix mapping, of them. The CKA engine (:mod:`repsim.cka`) and the statistics
(:mod:`repsim.stats`) read rows only through these functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from repsim.errors import is_whole
from repsim.store import Store


def feature_set(feats: Any, side: str, n: int | None = None) -> tuple[list[str], list[Any], int]:
    """``(names, matrices, n)`` of a feature set, checked (2-D, ``n`` rows each, or the given
    ``n``); unnamed layers are called ``a[0]``, ``a[1]``, ... (``side`` is the prefix).
    A :class:`repsim.store.Store` stands for all its layers (iterated, it names them)."""
    if isinstance(feats, Store):
        feats = feats.features()
    if isinstance(feats, Mapping):
        names, mats = [str(k) for k in feats], list(feats.values())
    elif len(getattr(feats, "shape", ())) == 2:
        raise ValueError(
            f"feats_{side} is a single (n, p) matrix; pass a sequence of matrices, e.g. [x]")
    else:
        mats = list(feats)
        names = [f"{side}[{i}]" for i in range(len(mats))]
    if not mats:
        raise ValueError("empty feature set: give at least one (n, p) matrix")
    # A frame (pandas, polars, xarray) has no .dtype and frame[idx] selects columns, not a
    # minibatch's rows: its array is read instead (a frame is in memory anyway).
    mats = [m.to_numpy() if hasattr(m, "to_numpy") and not isinstance(m, np.ndarray) else m
            for m in mats]
    for name, m in zip(names, mats):
        if not getattr(getattr(m, "id", None), "valid", True):  # h5py's, once closed (0)
            raise ValueError(f"layer {name!r} is a dataset of a closed HDF5 file (a store "
                             "left by its `with`); compare inside the `with Store(path) as "
                             "s:` block, or read it first: s[name][:]")
        if not hasattr(m, "shape"):  # a list of rows: "shape ()" would say what it is not
            raise ValueError(f"layer {name!r} is a {type(m).__name__}, not an (n, p) matrix; "
                             "pass np.asarray(...) of it, or a torch tensor")
        shape = tuple(m.shape)
        if len(shape) != 2:
            raise ValueError(f"layer {name!r} has shape {shape}; every layer must be a 2-D "
                             "(n, p) matrix (reduce token or channel axes at extraction)")
        n = shape[0] if n is None else n
        if shape[0] != n:
            raise ValueError(f"layer {name!r} has {shape[0]} rows but other layers have {n}; "
                             "every layer must hold the same samples in the same order")
        if shape[1] < 1:
            raise ValueError(f"layer {name!r} has no features (shape {shape})")
        dtype = getattr(m, "dtype", None)
        real = (not dtype.is_complex if isinstance(dtype, torch.dtype)
                else np.dtype(dtype).kind in "biuf")
        if not real:  # complex: the imaginary part would be lost, silently
            raise ValueError(f"layer {name!r} holds {dtype} values; CKA needs real numbers "
                             "(bool, int or float): pass x.real or x.abs(), or cast it")
    return names, mats, n


def pick_device(mats: list[Any], device: str | torch.device | None) -> torch.device:
    """``device`` if given, else that of the first torch tensor in ``mats``, else the CPU."""
    if device is not None:
        return torch.device(device)
    return next((m.device for m in mats if isinstance(m, torch.Tensor)), torch.device("cpu"))


def default_memory_budget(device: torch.device, given: Any = None) -> int:
    """``given`` (bytes, checked), else a quarter of the device's memory, 1 to 16 GiB."""
    if given is not None:  # 0 is no budget, "2GiB" no number of bytes
        if not is_whole(given):
            raise ValueError(f"memory_budget={given!r} is not a number of bytes >= 1, e.g. 2**30")
        return int(given)
    try:
        total = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        total = 8 * 1024**3
    return int(min(16 * 1024**3, max(1024**3, total // 4)))


def read_rows(x: Any, a: int, b: int | None, device: torch.device) -> torch.Tensor:
    """Rows ``a:b`` of any 2-D source: a fresh float64 tensor on ``device``."""
    blk = x[a:b]
    if isinstance(blk, torch.Tensor):  # detached: CKA is no part of the input's graph
        return blk.detach().to(device=device, dtype=torch.float64, copy=True)
    return torch.tensor(np.asarray(blk), dtype=torch.float64, device=device)


def centred_rows(x: Any, idx: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` (sorted; None: all) of any 2-D source, float64 on ``device``, minus their
    column means."""
    rows = read_rows(take(x, idx), 0, None, device)
    return rows.sub_(rows.mean(0))


def take(x: Any, idx: np.ndarray | None) -> Any:
    """Rows ``idx`` (sorted; None: all) of any 2-D source, in its own kind."""
    if isinstance(x, torch.Tensor) and idx is not None:
        return x[torch.as_tensor(idx, device=x.device)]
    return x if idx is None else x[idx]


def in_memory(mats: list[Any], budget: int) -> list[Any]:
    """``mats`` with the lazy sources (h5py datasets) read whole, each in one sequential pass,
    when together they fit ``budget`` bytes: random minibatches gather scattered rows, which
    h5py reads about 4x slower than the same rows in one block."""
    lazy = [not isinstance(m, (torch.Tensor, np.ndarray)) for m in mats]
    size = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m, z in zip(mats, lazy)
               if z)
    return [np.asarray(m[0:m.shape[0]]) if z and size <= budget else m
            for m, z in zip(mats, lazy)]
