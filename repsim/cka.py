"""Centered kernel alignment (CKA): every estimator, all layer pairs at once.

Shapes: a *feature matrix* is ``(n, p)`` -- one row per sample, rows aligned
across every layer of both models. A *feature set* is a sequence (or a
name -> matrix mapping) of such matrices, one per layer. Anything that has
``.shape`` and supports row slicing ``x[a:b]`` works: numpy arrays, torch
tensors on any device, and h5py datasets (read block by block, so stores larger
than memory are fine).

Estimators (Kornblith et al. 2019; Song et al. 2012; Nguyen, Raghu & Kornblith 2021):

- ``biased``: HSIC of doubly centred Grams, ``tr(K H L H)``.
- ``debiased``: the unbiased HSIC estimator via U-centring (zero diagonal,
  ``n - 2`` row means) -- the inner product of two U-centred Grams is
  ``n (n - 3)`` times unbiased HSIC.
- ``minibatch``: unbiased HSIC summed over batches of rows drawn at random (one seeded
  permutation, :func:`repsim.sketch.minibatches`), then
  ``sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L))``.

How it is fast: every layer's centred Gram (or one block of it) is built once
and flattened into a row of a stacked matrix; all ``La x Lb`` pair values are
then one matrix product ``G_A @ G_B.T``. Grams are built in float64 whatever the
input dtype, block by block over rows when ``n`` is large, so memory stays
bounded by ``memory_budget`` bytes. Results are never clamped: a negative
debiased value is an honest estimate.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repsim.sketch import (  # noqa: F401  (re-exported: part of this module's API)
    BANDWIDTH_SAMPLE,
    ESTIMATORS,
    KERNELS,
    CKAResult,
    block_bounds,
    cka_from_sketches,
    minibatches,
    normalise,
    sample_rows,
    sketch_size,
)

# --------------------------------------------------------------------------- inputs


def _named(feats: Any, side: str) -> tuple[list[str], list[Any]]:
    """Split a feature set into (names, matrices); unnamed layers get ``a[0]``-style names."""
    if isinstance(feats, Mapping):
        return [str(k) for k in feats], list(feats.values())
    if hasattr(feats, "shape") and len(getattr(feats, "shape", ())) == 2:
        raise ValueError(
            f"feats_{side} is a single (n, p) matrix; pass a sequence of matrices, e.g. [x]"
        )
    mats = list(feats)
    return [f"{side}[{i}]" for i in range(len(mats))], mats


def _check_shapes(names: list[str], mats: list[Any], n: int | None) -> int:
    if not mats:
        raise ValueError("empty feature set: give at least one (n, p) matrix")
    for name, m in zip(names, mats):
        shape = tuple(getattr(m, "shape", ()))
        if len(shape) != 2:
            raise ValueError(
                f"layer {name!r} has shape {shape}; every layer must be a 2-D (n, p) matrix "
                "(reduce token or channel axes at extraction)"
            )
        if n is None:
            n = shape[0]
        elif shape[0] != n:
            raise ValueError(
                f"layer {name!r} has {shape[0]} rows but other layers have {n}; every layer "
                "must hold the same samples in the same order"
            )
        if shape[1] < 1:
            raise ValueError(f"layer {name!r} has no features (shape {shape})")
    assert n is not None
    return n


def _pick_device(mats: list[Any], device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for m in mats:
        if isinstance(m, torch.Tensor):
            return m.device
    return torch.device("cpu")


def _rows(x: Any, a: int, b: int, device: torch.device) -> torch.Tensor:
    """Rows ``a:b`` of any 2-D source as a float64 tensor on ``device``."""
    blk = x[a:b]
    if isinstance(blk, torch.Tensor):
        return blk.to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(blk), dtype=torch.float64, device=device)


def _take(x: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` (sorted) of any 2-D source, in its own kind (array, tensor, h5py read)."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, device=x.device)]
    return x[idx]


def _in_memory(x: Any, budget: int) -> Any:
    """``x`` itself when it is an array or tensor; a lazy source (an h5py dataset) read whole,
    in one sequential pass, when it fits ``budget`` bytes. Random minibatches gather
    scattered rows, which h5py reads about 4x slower than the same rows in one block."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x
    size = int(np.prod(x.shape)) * np.dtype(getattr(x, "dtype", np.float64)).itemsize
    return np.asarray(x[0:x.shape[0]]) if size <= budget else x


# --------------------------------------------------------------------------- per-layer state


@dataclass
class _Layer:
    """One layer's source plus the statistics its Gram blocks need."""

    name: str
    src: Any
    n: int
    p: int
    mean: torch.Tensor | None = None  # (p,) column means, float64
    sqnorm: torch.Tensor | None = None  # (n,) squared norms of centred rows (RBF)
    rowsum: torch.Tensor | None = None  # (n,) row sums of K (hollow K if debiased)
    total: float = 0.0  # sum of K (hollow K if debiased)
    diag: torch.Tensor | None = None  # (n,) diagonal of K, filled while building blocks
    gamma: float | None = None  # RBF: 1 / (2 threshold^2 median d^2)
    median_sqdist: float | None = None
    degenerate: str | None = None  # why this layer's CKA is undefined (NaN)
    x: torch.Tensor | None = None  # (n, p) centred float64 features, when kept resident

    def block(self, a: int, b: int, device: torch.device) -> torch.Tensor:
        """Centred rows ``a:b``, float64, shape (b - a, p)."""
        if self.x is not None:
            return self.x[a:b]
        return _rows(self.src, a, b, device) - self.mean


def _non_finite(name: str, x: torch.Tensor, offset: int | np.ndarray) -> ValueError:
    """The error for non-finite rows of ``x``: rows ``offset + i``, or ``offset[i]``."""
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        where = f"first at row {int(offset[i]) if isinstance(offset, np.ndarray) else offset + i}"
    else:
        where = "its column sums overflow"
    return ValueError(
        f"layer {name!r} has non-finite values ({where}); check the activations "
        "(overflow in float16 storage?) before computing CKA"
    )


def _load_resident(layer: _Layer, device: torch.device) -> None:
    """Read a layer once into float64, check it, and centre its columns in place.

    A NaN or infinity anywhere makes its column sum non-finite (float64 sums of
    float32/float16 values cannot overflow), so one reduction does the finiteness
    check that a separate pass would.
    """
    # A private copy: centring happens in place, and float64 inputs would otherwise share
    # memory with the caller's array.
    src = layer.src[0:layer.n]
    if isinstance(src, torch.Tensor):
        x = src.to(device=device, dtype=torch.float64, copy=True)
    else:
        x = torch.tensor(np.asarray(src), dtype=torch.float64, device=device)
    colsum = x.sum(dim=0)
    if not bool(torch.isfinite(colsum).all()):
        raise _non_finite(layer.name, x, 0)
    # Inputs of at most 24 significant bits (float32/16, small ints) sum exactly in float64,
    # so a constant column centres to exact zeros and a cheap any() decides constancy;
    # float64 inputs need the direct comparison.
    wide = src.dtype in (torch.float64, np.float64, torch.int64, np.int64, np.int32,
                         torch.int32)
    constant = bool((x == x[:1]).all()) if wide else None
    layer.mean = colsum / layer.n
    layer.x = x.sub_(layer.mean)
    if constant is None:
        constant = not bool(layer.x.any())
    if constant:
        layer.degenerate = "has zero variance (every row is identical)"


def _scan(layer: _Layer, step: int, device: torch.device) -> None:
    """One pass over the rows: finiteness, constancy and column means (in the input dtype)."""
    colsum = torch.zeros(layer.p, dtype=torch.float64, device=device)
    first = None
    constant = True
    for a, b in block_bounds(layer.n, step):
        x = layer.src[a:b]
        x = x.to(device) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x),
                                                                               device=device)
        if not torch.isfinite(x).all():
            raise _non_finite(layer.name, x, a)
        if first is None:
            first = x[:1]
        constant = constant and bool((x == first).all())
        colsum += x.sum(dim=0, dtype=torch.float64)
    layer.mean = colsum / layer.n
    if constant:
        layer.degenerate = "has zero variance (every row is identical)"


def _sqdist(x: torch.Tensor) -> torch.Tensor:
    """All squared distances among the rows of ``x``: ``(m, m)`` float64, diagonal included."""
    sq = (x * x).sum(dim=1)
    d = x @ x.T
    # |a|^2 + |b|^2 - 2 a.b, as in Kornblith et al.'s reference (no clamping).
    return d.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :])


def _median(v: torch.Tensor) -> float:
    """numpy.median semantics (mean of the two middle values for even counts)."""
    m = v.numel()
    k = m // 2
    if v.device.type == "cpu":
        part = np.partition(v.numpy(), [k - 1, k] if m % 2 == 0 else [k])
        return float(part[k]) if m % 2 else float((part[k - 1] + part[k]) / 2)
    hi = torch.kthvalue(v, k + 1).values
    if m % 2:
        return float(hi)
    return float((torch.kthvalue(v, k).values + hi) / 2)


def _set_bandwidth(layer: _Layer, threshold: float, step: int, device: torch.device) -> None:
    """RBF bandwidth from the median of all n x n squared distances (diagonal included).

    Needs one n x n float64 matrix (800 MB at n = 10,000), freed before the next layer.
    """
    x = torch.cat([layer.block(a, b, device) for a, b in block_bounds(layer.n, step)])
    layer.sqnorm = (x * x).sum(1)  # the Gram blocks need it; x is at hand only here
    d = _sqdist(x)
    del x
    med = _median(d.flatten())
    layer.median_sqdist = med
    if not med > 0:
        layer.degenerate = (
            f"has a zero median squared distance ({med:.3g}), so the RBF bandwidth is zero"
        )
    else:
        layer.gamma = 1.0 / (2.0 * threshold**2 * med)


def _strip_grams(layers: list[_Layer], live: list[int], rows_x: dict, cols_x: dict,
                 rows: tuple[int, int], cols: tuple[int, int], diag_width: int,
                 hollow: bool, buf: torch.Tensor) -> torch.Tensor:
    """Raw kernel strips ``K[rows, cols]`` of the live layers, stacked: ``(L, s, w)``.

    The first ``diag_width`` columns lie on the Gram's diagonal block (counted once);
    the rest are off-diagonal and will be counted twice, so they are scaled by
    sqrt(2) -- one product of the stacked strips then weights them by 2. Row sums
    (RBF) and the diagonal are recorded on the layers before scaling.
    """
    s, w = rows[1] - rows[0], cols[1] - cols[0]
    out = buf.view(-1)[: len(live) * s * w].view(len(live), s, w)
    for r, i in enumerate(live):
        L, g = layers[i], out[r]
        torch.matmul(rows_x[i], cols_x[i].T, out=g)
        if L.gamma is not None:
            g.mul_(-2.0).add_(L.sqnorm[rows[0]:rows[1], None])
            g.add_(L.sqnorm[None, cols[0]:cols[1]]).mul_(-L.gamma).exp_()
        if diag_width:
            d = g[:, :diag_width].diagonal()
            L.diag[rows[0]:rows[1]] = d
            if hollow:
                d.zero_()
        if L.gamma is not None:  # K 1 from the strip and, by symmetry, its mirror image
            L.rowsum[rows[0]:rows[1]] += g.sum(1)
            if w > diag_width:
                L.rowsum[cols[0] + diag_width:cols[1]] += g[:, diag_width:].sum(0)
    if w > diag_width:
        out[:, :, diag_width:] *= math.sqrt(2.0)
    return out


def _hsic_all_pairs(
    layers_a: list[_Layer], layers_b: list[_Layer] | None, debiased: bool,
    device: torch.device, memory_budget: int, progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled HSIC for every pair plus self terms: ``(La, Lb)``, ``(La,)``, ``(Lb,)``.

    Step 1 builds each layer's raw Gram once, over its upper trapezoid only
    (Grams are symmetric), in strips of rows, and adds ``<K_a, K_b>`` for all
    pairs with one product of the stacked strips. Step 2 applies the centring
    exactly through row sums (``r = K 1``, ``s = 1' K 1``):

    - biased: ``tr(K H L H) = <K, L> - 2/n r_K . r_L + s_K s_L / n^2``
    - debiased (hollow K, L): ``n(n-3) HSIC_u = <K, L> + s_K s_L / ((n-1)(n-2))
      - 2/(n-2) r_K . r_L`` (Song et al. 2012).

    For the linear kernel the columns are centred first, so ``K 1 = 0``; this
    also keeps the products free of cancellation. ``layers_b=None`` means "B is A".
    """
    same = layers_b is None
    lb = layers_a if same else layers_b
    n = layers_a[0].n
    cross = torch.zeros(len(layers_a), len(lb), dtype=torch.float64, device=device)
    self_a = torch.zeros(len(layers_a), dtype=torch.float64, device=device)
    self_b = torch.zeros(len(lb), dtype=torch.float64, device=device)
    live_a = [i for i, L in enumerate(layers_a) if not L.degenerate]
    live_b = [j for j, L in enumerate(lb) if not L.degenerate]
    if not live_a or not live_b:
        return cross, self_a, self_b
    everyone = layers_a if same else layers_a + lb
    for L in everyone:
        L.diag = torch.zeros(n, dtype=torch.float64, device=device)
        L.rowsum = torch.zeros(n, dtype=torch.float64, device=device)

    # Memory plan (made by the caller): centred float64 features are resident when they
    # fit in half the budget; otherwise one row block and one column block, a quarter of
    # the budget each, are read from the sources at a time.
    n_live = len(live_a) + (0 if same else len(live_b))
    keep = all(L.x is not None for L in everyone if not L.degenerate)
    if keep:
        block = n
    else:
        per_row = 8 * max(L.p for L in everyone) * n_live
        block = max(8, int((memory_budget // 4) // per_row))
        block = math.ceil(n / math.ceil(n / block))
    # Strips: small enough for cache-friendly products and a bounded stacked buffer,
    # many enough that the skipped lower triangle saves real work.
    strip_budget = memory_budget // 4
    strip = max(16, min(int(strip_budget // (8 * n_live * block)),
                        1024 if device.type != "cpu" else 256, n))
    buf_a = torch.empty(len(live_a) * strip * block, dtype=torch.float64, device=device)
    buf_b = buf_a if same else torch.empty(len(live_b) * strip * block, dtype=torch.float64,
                                           device=device)
    ia, ib = torch.tensor(live_a, device=device), torch.tensor(live_b, device=device)

    # Row and column blocks are read once per block pair (a re-read converts a whole
    # block when features stream from a store); strips then slice them.
    bounds = block_bounds(n, block)
    pairs = [(k, c) for k in range(len(bounds)) for c in range(k, len(bounds))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pairs), desc="CKA", unit="block", leave=False)
    ra = rb = None
    for k, c in pairs:
        (r0, r1), (c0, c1) = bounds[k], bounds[c]
        if c == k:
            ra = rb = ca = cb = None  # free the previous row block before reading the next
            ra = {i: layers_a[i].block(r0, r1, device) for i in live_a}
            rb = ra if same else {j: lb[j].block(r0, r1, device) for j in live_b}
            ca, cb = ra, rb
        else:
            ca = cb = None
            ca = {i: layers_a[i].block(c0, c1, device) for i in live_a}
            cb = ca if same else {j: lb[j].block(c0, c1, device) for j in live_b}
        for s0, s1 in block_bounds(r1 - r0, strip):
            rows = (r0 + s0, r0 + s1)
            # On a diagonal block: the trapezoid from this strip's diagonal on.
            lo, dw = (s0, s1 - s0) if c == k else (0, 0)
            cols = (c0 + lo, c1)
            ga = _strip_grams(layers_a, live_a, {i: ra[i][s0:s1] for i in live_a},
                              {i: ca[i][lo:] for i in live_a}, rows, cols, dw, debiased,
                              buf_a)
            if same:
                gb = ga
            else:
                gb = _strip_grams(lb, live_b, {j: rb[j][s0:s1] for j in live_b},
                                  {j: cb[j][lo:] for j in live_b}, rows, cols, dw, debiased,
                                  buf_b)
            fa, fb = ga.flatten(1), gb.flatten(1)
            cross[ia[:, None], ib[None, :]] += fa @ fb.T
            self_a[ia] += (fa * fa).sum(1)
            if not same:
                self_b[ib] += (fb * fb).sum(1)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    ra = rb = ca = cb = None

    def sums(layers: list[_Layer]) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.zeros(len(layers), n, dtype=torch.float64, device=device)
        for i, L in enumerate(layers):
            if not L.degenerate:
                if L.gamma is not None:  # summed after the diagonal was zeroed if hollow
                    r[i] = L.rowsum
                elif debiased:
                    r[i] = -L.diag  # hollow K of centred columns: K 1 - diag(K)
        return r, r.sum(1)

    ra, sa = sums(layers_a)
    rb, sb = (ra, sa) if same else sums(lb)
    if debiased:
        c1, c2 = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
    else:
        c1, c2 = 1.0 / n**2, 2.0 / n
    cross += c1 * sa[:, None] * sb[None, :] - c2 * (ra @ rb.T)
    self_a += c1 * sa * sa - c2 * (ra * ra).sum(1)
    if same:
        return cross, self_a, self_a
    self_b += c1 * sb * sb - c2 * (rb * rb).sum(1)
    return cross, self_a, self_b


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the device's memory, between 1 and 16 GiB."""
    try:
        if device.type == "cuda":
            total = torch.cuda.mem_get_info(device)[0]
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        total = 8 * 1024**3
    return int(min(16 * 1024**3, max(1024**3, total // 4)))


def _normalise(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> np.ndarray:
    """``cross / sqrt(self_a self_b)``; NaN where a self term is not positive."""
    return normalise(cross.cpu().numpy(), self_a.cpu().numpy(), self_b.cpu().numpy())


def _warn_degenerate(layers: list[_Layer]) -> None:
    for layer in layers:
        if layer.degenerate:
            warnings.warn(
                f"layer {layer.name!r} {layer.degenerate}; its CKA values are NaN",
                RuntimeWarning,
                stacklevel=3,
            )


# --------------------------------------------------------------------------- public API


def _validate_options(kernel: str, estimator: str, threshold: float, batch_size: int | None):
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels: {', '.join(KERNELS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}"
        )
    if kernel == "rbf" and not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    if estimator == "minibatch":
        if batch_size is None:
            raise ValueError("estimator 'minibatch' needs batch_size (rows per batch, >= 4)")
        if int(batch_size) != batch_size or batch_size < 4:
            raise ValueError(
                f"batch_size must be an integer >= 4 for the unbiased minibatch estimator, "
                f"got {batch_size!r}"
            )


def compare(
    feats_a: Any,
    feats_b: Any,
    *,
    kernel: str = "linear",
    estimator: str = "biased",
    threshold: float = 1.0,
    batch_size: int | None = None,
    batch_seed: int = 0,
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> CKAResult:
    """CKA between every layer of ``feats_a`` and every layer of ``feats_b``.

    ``feats_a``/``feats_b``: sequences (or name -> matrix mappings) of ``(n, p_l)``
    matrices with the same ``n``. Passing the same object twice computes the
    self-similarity matrix with half the work. ``batch_seed`` draws the minibatch
    estimator's random batches. Returns a :class:`CKAResult` whose ``matrix`` has shape
    ``(La, Lb)``.
    """
    _validate_options(kernel, estimator, threshold, batch_size)
    names_a, mats_a = _named(feats_a, "a")
    same = feats_b is feats_a
    names_b, mats_b = (names_a, mats_a) if same else _named(feats_b, "b")
    n = _check_shapes(names_a, mats_a, None)
    _check_shapes(names_b, mats_b, n)
    debiased = estimator != "biased"
    if debiased and n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 rows, got n={n}")
    if estimator == "biased" and n < 2:
        raise ValueError(f"CKA needs at least 2 rows, got n={n}")
    dev = _pick_device(mats_a + mats_b, device)
    common = dict(kernel=kernel, estimator=estimator, n=n,
                  threshold=threshold if kernel == "rbf" else None)

    if estimator == "minibatch":
        return _compare_minibatch(names_a, mats_a, names_b, mats_b, same, int(batch_size),
                                  batch_seed, kernel, threshold, dev, common, progress)

    budget = memory_budget or default_memory_budget(dev)
    step = 4096  # rows per read in the scanning passes
    layers_a = [_Layer(nm, m, n, m.shape[1]) for nm, m in zip(names_a, mats_a)]
    layers_b = layers_a if same else [_Layer(nm, m, n, m.shape[1])
                                      for nm, m in zip(names_b, mats_b)]
    all_layers = layers_a if same else layers_a + layers_b
    # Centred float64 features stay resident when they fit in half the budget (one read
    # and one conversion per layer); otherwise row blocks stream from the sources.
    resident = 8 * n * sum(L.p for L in all_layers) <= budget // 2
    for layer in all_layers:
        if resident:
            _load_resident(layer, dev)
            if layer.degenerate:
                layer.x = None
        else:
            _scan(layer, step, dev)
    if kernel == "rbf":
        for layer in all_layers:
            if not layer.degenerate:
                _set_bandwidth(layer, threshold, step, dev)
    _warn_degenerate(all_layers)
    cross, sa, sb = _hsic_all_pairs(layers_a, None if same else layers_b, debiased, dev,
                                    budget, progress)
    matrix = _normalise(cross, sa, sb)
    if same:
        matrix = (matrix + matrix.T) / 2  # exact symmetry despite summation order
    res = CKAResult(matrix=matrix, layers_a=names_a, layers_b=names_b, **common)
    if kernel == "rbf":
        res.bandwidths_a = [L.median_sqdist for L in layers_a]
        res.bandwidths_b = [L.median_sqdist for L in layers_b]
    return res


def cka_matrix(
    feats_a: Any,
    feats_b: Any,
    *,
    kernel: str = "linear",
    estimator: str = "biased",
    threshold: float = 1.0,
    batch_size: int | None = None,
    batch_seed: int = 0,
) -> np.ndarray:
    """CKA for all layer pairs: float64 array of shape ``(len(feats_a), len(feats_b))``.

    See :func:`compare` for the same computation with its metadata (bandwidths, n).
    """
    return compare(feats_a, feats_b, kernel=kernel, estimator=estimator,
                   threshold=threshold, batch_size=batch_size, batch_seed=batch_seed).matrix


def linear_cka(x: Any, y: Any, *, debiased: bool = False) -> float:
    """Linear CKA of two ``(n, p)`` / ``(n, q)`` matrices with the same rows."""
    est = "debiased" if debiased else "biased"
    return float(compare([x], [y], kernel="linear", estimator=est).matrix[0, 0])


def rbf_cka(x: Any, y: Any, *, threshold: float = 1.0, debiased: bool = False) -> float:
    """RBF-kernel CKA; bandwidth ``threshold * sqrt(median squared distance)`` per matrix."""
    est = "debiased" if debiased else "biased"
    return float(compare([x], [y], kernel="rbf", estimator=est, threshold=threshold).matrix[0, 0])


# --------------------------------------------------------------------------- minibatch


def rbf_bandwidths(feats: Any, rows: np.ndarray | None = None) -> list[float]:
    """Median squared distance (diagonal included) per layer over ``rows`` (default: all).

    ``rows`` must be increasing indices (h5py datasets need that).
    """
    names, mats = _named(feats, "a")
    _check_shapes(names, mats, None)
    dev = _pick_device(mats, None)
    out = []
    for m in mats:
        if rows is None:
            x = _rows(m, 0, m.shape[0], dev)
        elif isinstance(m, torch.Tensor):
            x = _rows(m[torch.as_tensor(rows, device=m.device)], 0, len(rows), dev)
        else:
            x = _rows(m[np.asarray(rows)], 0, len(rows), dev)
        out.append(_median(_sqdist(x - x.mean(0)).flatten()))
    return out


class MinibatchCKA:
    """Accumulates unbiased HSIC over batches (Nguyen, Raghu & Kornblith 2021).

    ``update(batch_a, batch_b)`` takes one batch: sequences of ``(m, p_l)``
    matrices for the same ``m`` samples. ``compute()`` returns the ``(La, Lb)``
    CKA matrix. The raw sums (``hsic_ab_``, ``hsic_aa_``, ``hsic_bb_``) are plain
    float64 tensors, so sums from several processes can be added
    (:meth:`merge`, or ``torch.distributed.all_reduce`` on :meth:`sums`).

    For ``kernel="rbf"`` give the per-layer median squared distances
    (``median_sqdist_a``/``_b``), fixed for the whole run; see :func:`rbf_bandwidths`.
    """

    def __init__(
        self,
        *,
        kernel: str = "linear",
        threshold: float = 1.0,
        median_sqdist_a: Sequence[float] | None = None,
        median_sqdist_b: Sequence[float] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        _validate_options(kernel, "biased", threshold, None)
        if kernel == "rbf" and (median_sqdist_a is None or median_sqdist_b is None):
            raise ValueError(
                "RBF minibatch CKA needs fixed bandwidths: pass median_sqdist_a and "
                "median_sqdist_b (see repsim.cka.rbf_bandwidths)"
            )
        self.kernel = kernel
        self.threshold = threshold
        self.median_sqdist_a = None if median_sqdist_a is None else list(median_sqdist_a)
        self.median_sqdist_b = None if median_sqdist_b is None else list(median_sqdist_b)
        self.device = None if device is None else torch.device(device)
        self.hsic_ab_: torch.Tensor | None = None
        self.hsic_aa_: torch.Tensor | None = None
        self.hsic_bb_: torch.Tensor | None = None
        self.n_batches_ = 0
        self.n_samples_ = 0

    def _layers(self, names: list[str], mats: list[Any], meds: list[float] | None,
                dev: torch.device) -> list[_Layer]:
        m = mats[0].shape[0]
        if self.kernel == "rbf" and len(meds) != len(mats):
            raise ValueError(f"got {len(meds)} bandwidths for {len(mats)} layers")
        layers = []
        for k, (nm, x) in enumerate(zip(names, mats)):
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            L = _Layer(nm, x.to(dev), m, x.shape[1])
            _load_resident(L, dev)  # raises on non-finite values; constant-in-batch adds 0
            if L.degenerate:
                L.x = None
            if self.kernel == "rbf" and not L.degenerate:
                if not meds[k] > 0:
                    L.degenerate = "has a zero bandwidth"
                else:
                    L.gamma = 1.0 / (2.0 * self.threshold**2 * meds[k])
                    L.sqnorm = (L.block(0, m, dev) ** 2).sum(1)
            layers.append(L)
        return layers

    def update(self, batch_a: Any, batch_b: Any) -> None:
        """Add one batch. A batch of fewer than 4 rows is skipped with a warning."""
        names_a, mats_a = _named(batch_a, "a")
        same = batch_b is batch_a
        names_b, mats_b = (names_a, mats_a) if same else _named(batch_b, "b")
        m = _check_shapes(names_a, mats_a, None)
        _check_shapes(names_b, mats_b, m)
        if m < 4:
            warnings.warn(
                f"dropping a batch of {m} rows: the unbiased HSIC estimator needs at least 4",
                RuntimeWarning, stacklevel=2,
            )
            return
        dev = self.device or _pick_device(mats_a + mats_b, None)
        la = self._layers(names_a, mats_a, self.median_sqdist_a, dev)
        lb = None if same else self._layers(names_b, mats_b, self.median_sqdist_b, dev)
        ab, aa, bb = _hsic_all_pairs(la, lb, True, dev, default_memory_budget(dev))
        scale = 1.0 / (m * (m - 3))  # U-centred inner products are n(n-3) HSIC_u
        ab, aa, bb = ab * scale, aa * scale, bb * scale
        if self.hsic_ab_ is None:  # own copies: with A == B, aa and bb are one tensor
            self.hsic_ab_, self.hsic_aa_, self.hsic_bb_ = ab.clone(), aa.clone(), bb.clone()
        else:
            if self.hsic_ab_.shape != ab.shape:
                raise ValueError(
                    f"batch has {tuple(ab.shape)} layer pairs, earlier batches had "
                    f"{tuple(self.hsic_ab_.shape)}"
                )
            self.hsic_ab_ += ab.to(self.hsic_ab_.device)
            self.hsic_aa_ += aa.to(self.hsic_aa_.device)
            self.hsic_bb_ += bb.to(self.hsic_bb_.device)
        self.n_batches_ += 1
        self.n_samples_ += m

    def sums(self) -> dict[str, torch.Tensor]:
        """The raw float64 sums; adding these across processes is exact merging."""
        if self.hsic_ab_ is None:
            raise ValueError("no batch has been added yet")
        return {"hsic_ab": self.hsic_ab_, "hsic_aa": self.hsic_aa_, "hsic_bb": self.hsic_bb_,
                "n_batches": torch.tensor(float(self.n_batches_), dtype=torch.float64),
                "n_samples": torch.tensor(float(self.n_samples_), dtype=torch.float64)}

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add another accumulator's sums into this one (same layers and kernel)."""
        if other.hsic_ab_ is None:
            return self
        if self.hsic_ab_ is None:
            self.hsic_ab_ = other.hsic_ab_.clone()
            self.hsic_aa_ = other.hsic_aa_.clone()
            self.hsic_bb_ = other.hsic_bb_.clone()
        else:
            self.hsic_ab_ += other.hsic_ab_.to(self.hsic_ab_.device)
            self.hsic_aa_ += other.hsic_aa_.to(self.hsic_aa_.device)
            self.hsic_bb_ += other.hsic_bb_.to(self.hsic_bb_.device)
        self.n_batches_ += other.n_batches_
        self.n_samples_ += other.n_samples_
        return self

    def compute(self) -> np.ndarray:
        """CKA matrix ``(La, Lb)``; NaN where a layer's summed self-HSIC is not positive."""
        if self.hsic_ab_ is None:
            raise ValueError("no batch has been added yet")
        return _normalise(self.hsic_ab_, self.hsic_aa_, self.hsic_bb_)


def _compare_minibatch(names_a, mats_a, names_b, mats_b, same, batch_size, batch_seed, kernel,
                       threshold, dev, common, progress) -> CKAResult:
    n = common["n"]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 rows, got n={n}")
    batches = minibatches(n, batch_size, batch_seed)
    if not batches:
        raise ValueError(f"batch_size {batch_size} leaves no batch of at least 4 of {n} rows")
    left = n - sum(len(b) for b in batches)
    if left:
        warnings.warn(
            f"dropping {left} of {n} rows (the last, short random batch): the unbiased HSIC "
            "estimator needs at least 4; choose a batch_size that leaves >= 4",
            RuntimeWarning, stacklevel=3,
        )
    rows = meds_a = meds_b = None
    if kernel == "rbf":
        rows = sample_rows(n, BANDWIDTH_SAMPLE)
        meds_a = rbf_bandwidths(dict(zip(names_a, mats_a)), rows)
        meds_b = meds_a if same else rbf_bandwidths(dict(zip(names_b, mats_b)), rows)
    # Lazy sources that fit half the memory budget together are read once, in order.
    lazy = [m for m in (mats_a if same else mats_a + mats_b)
            if not isinstance(m, (torch.Tensor, np.ndarray))]
    total = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in lazy)
    if lazy and total <= default_memory_budget(dev) // 2:
        mats_a = [_in_memory(m, total) for m in mats_a]
        mats_b = mats_a if same else [_in_memory(m, total) for m in mats_b]
    acc = MinibatchCKA(kernel=kernel, threshold=threshold, median_sqdist_a=meds_a,
                       median_sqdist_b=meds_b, device=dev)
    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc="minibatch CKA", unit="batch")
    for idx in it:
        ba = [_take(m, idx) for m in mats_a]
        acc.update(ba, ba if same else [_take(m, idx) for m in mats_b])
    matrix = acc.compute()
    # One read per batch does all the checking: non-finite values raise in update(), and a
    # layer that is constant within every batch has a zero self-sum (NaN via _normalise).
    dead_a = [i for i, v in enumerate(acc.hsic_aa_.tolist()) if v == 0]
    dead_b = dead_a if same else [j for j, v in enumerate(acc.hsic_bb_.tolist()) if v == 0]
    sides = [(names_a, dead_a)] + ([] if same else [(names_b, dead_b)])
    for names, dead in sides:
        for i in dead:
            warnings.warn(f"layer {names[i]!r} has zero variance within every batch; its CKA "
                          "values are NaN", RuntimeWarning, stacklevel=3)
    matrix[dead_a, :] = np.nan
    matrix[:, dead_b] = np.nan
    if same:
        matrix = (matrix + matrix.T) / 2
    res = CKAResult(matrix=matrix, layers_a=names_a, layers_b=names_b, batch_size=batch_size,
                    batch_seed=batch_seed, n_batches=acc.n_batches_, **common)
    if kernel == "rbf":
        res.bandwidths_a, res.bandwidths_b = meds_a, meds_b
        res.bandwidth_rows = [int(i) for i in rows]
    return res


# --------------------------------------------------------------------------- sketches
#
# Every estimator here is an inner product of centred Gram matrices, so each layer can be
# reduced once to a float64 vector ``s`` with HSIC(a, b) = s_a . s_b: the strict upper
# triangle of its U-centred batch Grams (debiased, minibatch) or the upper triangle of
# H K H (biased), off-diagonal entries scaled by sqrt(2). A cached sketch turns every
# further comparison involving that layer into one small matrix product.


def _centred_upper(k: torch.Tensor, estimator: str, n: int,
                   iu: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A block's sketch entries from its ``(m, m)`` Gram ``k`` (``iu``: its upper-triangle
    indices, diagonal included for "biased").

    Biased: ``H K H / n`` (s.s = tr(KHLH) / n^2). Otherwise Song et al.'s U-centring of the
    hollow Gram, scaled so that s.s sums HSIC_u over batches. Off-diagonal entries carry
    sqrt(2): each stands for itself and its mirror image.
    """
    m = k.shape[0]
    rows, cols = iu
    if estimator == "biased":
        c = k.sum(0) / m  # row means = column means: K is symmetric
        v = (k[rows, cols] - c[rows] - c[cols] + c.sum() / m) / n
        v[rows != cols] *= math.sqrt(2.0)
        return v
    r = k.sum(1) - k.diagonal()  # row sums of the hollow Gram
    u = k[rows, cols] - (r[rows] + r[cols]) / (m - 2) + r.sum() / ((m - 1) * (m - 2))
    return u * (math.sqrt(2.0) / math.sqrt(m * (m - 3)))


def _gather(x: Any, idx: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of any 2-D source converted into ``out``, a float64 buffer view of
    ``len(idx)`` rows on any device (reused: fresh memory costs more than the copy)."""
    src = _take(x, idx)
    if not isinstance(src, torch.Tensor):
        src = torch.from_numpy(np.asarray(src))
    return out.copy_(src)


def _sketch_gram(blk: torch.Tensor, kernel: str, median_sqdist: float | None,
                 threshold: float) -> torch.Tensor | None:
    """The raw Gram of one block of rows (overwritten), or None when it is not finite.

    Rows are shifted by the first row, in place: centring (double or U-) removes any shift
    exactly, and a block of identical rows becomes exact zeros, so a constant batch gives
    an all-zero Gram (its layer's CKA is then NaN) without a separate pass.
    """
    if kernel == "rbf" and not bool(torch.isfinite(blk.sum(0)).all()):
        return None
    blk -= blk[0].clone()
    if kernel == "linear":
        k = blk @ blk.T
        d = k.diagonal()  # squared norms: non-finite iff a row is, zero iff rows are equal
        if not bool(torch.isfinite(d).all()):
            return None
        return k
    if not bool(torch.linalg.vector_norm(blk, dim=1).any()) or not median_sqdist > 0:
        return torch.zeros(blk.shape[0], blk.shape[0], dtype=torch.float64, device=blk.device)
    return torch.exp(_sqdist(blk) * (-1.0 / (2.0 * threshold**2 * median_sqdist)))


def _sketch_part(blk: torch.Tensor, kernel: str, estimator: str, n: int,
                 median_sqdist: float | None, threshold: float) -> torch.Tensor | None:
    """One block's share of a layer sketch from its float64 rows (overwritten): the
    upper triangle of the doubly centred (biased) or U-centred Gram, scaled so that sketch
    inner products give the estimator's sums. None when the block is not finite."""
    m = blk.shape[0]
    k = _sketch_gram(blk, kernel, median_sqdist, threshold)
    if k is None:
        return None
    iu = torch.triu_indices(m, m, 0 if estimator == "biased" else 1, device=blk.device)
    return _centred_upper(k, estimator, n, (iu[0], iu[1]))


def layer_sketch(x: Any, *, kernel: str = "linear", estimator: str = "biased",
                 threshold: float = 1.0, batch_size: int | None = None, batch_seed: int = 0,
                 median_sqdist: float | None = None,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """One layer's ``(D,)`` float64 sketch (see :func:`sketch_size`) for :func:`cka_from_sketches`.

    ``x`` is ``(n, p)``. RBF needs the layer's ``median_sqdist``: over all rows for
    biased/debiased, over the fixed sample of :func:`rbf_bandwidths` for minibatch -- the
    same bandwidths :func:`compare` uses. Minibatch sketches use the random batches of
    :func:`repsim.sketch.minibatches` (``batch_seed``), as :func:`compare` does.
    Non-finite input raises ``ValueError``; constant batches add zeros (a constant layer's
    sketch is all zeros, and its CKA is NaN).
    """
    _validate_options(kernel, estimator, threshold, batch_size)
    n = x.shape[0]
    dev = _pick_device([x], device)
    if kernel == "rbf" and median_sqdist is None:
        raise ValueError("the RBF kernel needs median_sqdist (see rbf_bandwidths)")
    if estimator == "minibatch":
        batches = minibatches(n, batch_size, batch_seed)
        x = _in_memory(x, default_memory_budget(dev) // 2)
    else:
        batches = [np.arange(n)]
    parts = []
    buf = None  # one float64 block buffer, reused (see _gather)
    for idx in batches:
        m = len(idx)
        if buf is None:
            buf = torch.empty(max(len(b) for b in batches), x.shape[1], dtype=torch.float64,
                              device=dev)
        v = _sketch_part(_gather(x, idx, buf[:m]), kernel, estimator, n, median_sqdist,
                         threshold)
        if v is None:
            raise _non_finite("x", _rows(_take(x, idx), 0, m, dev), idx)
        parts.append(v)
    return torch.cat(parts)
