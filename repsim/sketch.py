"""CKA results, row batches, layer sketches, and CKA between the layers of two stores.

Every CKA estimate is an inner product of centred Grams, so a layer can be reduced once to a
float64 *sketch* vector (:func:`repsim.cka.layer_sketch`) and any later comparison with it
is one small product of sketches (:func:`cka_from_sketches`); ``repsim cka`` caches each store
layer's sketch. This module imports numpy only: importing torch takes 3-4 s here, longer
than a whole comparison of cached sketches, so that path never imports it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from repsim.errors import finite_real, is_whole

KERNELS = ("linear", "rbf")
ESTIMATORS = ("biased", "debiased", "minibatch")
BANDWIDTH_SAMPLE = 1000  # rows used to fix the RBF bandwidth in minibatch mode
# The default estimator is minibatch CKA in batches of 1,024 (Raghu et al. 2021): unbiased,
# and one batch, that is debiased CKA, whenever n <= 1,024. The biased estimator reads high
# on layers wider than the probe set (repsim.stats: its null mean is sqrt(PR_a PR_b)/(n-1)).
DEFAULT_ESTIMATOR, DEFAULT_BATCH_SIZE = "minibatch", 1024
# Bump when a fix changes the numbers that CKA results, their statistics (repsim.stats) or
# layer sketches hold for the same inputs: cached results and sketches are keyed on it
# (repsim.compare), so those made before the fix are made again, not reused. Here, not in
# repsim.cka, so that the cached path can read it without importing torch.
# 2: minibatch n_over_pr per batch; influence ranks NaN rows first; 3: a self-comparison's
# permutation null is symmetric
CONTENT_VERSION = 3


@dataclass
class CKAResult:
    """A CKA matrix with what is needed to interpret and reproduce it."""

    matrix: np.ndarray  # (La, Lb) float64
    layers_a: list[str]
    layers_b: list[str]
    kernel: str
    estimator: str
    n: int
    threshold: float | None = None
    batch_size: int | None = None
    batch_seed: int | None = None  # minibatch: seed of the random batches (see minibatches)
    n_batches: int | None = None
    bandwidths_a: list[float] | None = None  # RBF: median squared distance per layer
    bandwidths_b: list[float] | None = None
    bandwidth_rows: list[int] | None = None  # minibatch RBF: rows the bandwidth came from
    # How much to trust each cell (repsim.stats.calibrate): arrays shaped like ``matrix``,
    # or per layer (``pr_a``, ``pr_b``); None when not computed.
    se: np.ndarray | None = None  # jackknife standard error
    se_method: str | None = None  # "delete-one-image" or "delete-one-batch"
    pr_a: np.ndarray | None = None  # participation ratio (effective dimensionality)
    pr_b: np.ndarray | None = None
    biased_null_mean: np.ndarray | None = None  # sqrt(PR_a PR_b) / (m - 1)
    permutations: int | None = None  # permutation null: its size, seed and summaries
    permutation_seed: int | None = None
    p_value: np.ndarray | None = None
    null_mean: np.ndarray | None = None
    null_q95: np.ndarray | None = None
    influence: list | None = None  # per cell: [[sample id, change without it], ...]

    def to_dict(self) -> dict:
        """JSON-ready dict; arrays become lists, NaN becomes ``None``. With participation
        ratios it adds ``n_over_pr_a`` and ``n_over_pr_b``, images per effective dimension:
        where it is small the biased estimator reads high (Murphy, Zylberberg & Fyshe 2024).
        The images are those of one Gram, which each PR is measured on and bounded by (less
        1): all ``n``, but for minibatch CKA one batch, ``min(n, batch_size)`` (n over a PR
        averaged over batches would count every batch's images as one Gram's)."""
        out = {k: jsonable(v) for k, v in self.__dict__.items()}
        mini = self.estimator == "minibatch" and self.batch_size is not None
        m = min(self.n, self.batch_size) if mini else self.n
        for side in ("a", "b"):
            pr = getattr(self, f"pr_{side}")
            if pr is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[f"n_over_pr_{side}"] = jsonable(m / np.asarray(pr, dtype=float))
        return out


def jsonable(v: Any) -> Any:
    """``v`` for JSON, through dicts and lists: arrays and tuples as lists, numpy scalars as
    Python's, non-finite floats as None (json.dumps writes a bare NaN, which strict readers
    refuse)."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.ndarray, np.generic)):
        return jsonable(v.tolist())
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def new_result(layers_a: Sequence[str], layers_b: Sequence[str], kernel: str, estimator: str,
               n: int, threshold: float, batch_size: int | None, batch_seed: int) -> CKAResult:
    """A :class:`CKAResult` with its settings (checked by :func:`check_options`) filled in,
    ``matrix`` and bandwidths still to come (:func:`batches` warns of rows left out)."""
    res = CKAResult(np.empty((0, 0)), list(layers_a), list(layers_b), kernel, estimator, n,
                    threshold if kernel == "rbf" else None)
    if estimator == "minibatch":
        res.batch_size, res.batch_seed = batch_size, batch_seed
        res.n_batches = len(minibatches(n, batch_size, batch_seed))
        if kernel == "rbf":
            res.bandwidth_rows = bandwidth_rows(n, estimator).tolist()
    return res


def check_options(kernel: str, estimator: str, threshold: float = 1.0,
                  batch_size: int | None = None) -> int | None:
    """ValueError unless the CKA settings are valid (``threshold`` matters for RBF only).
    Returns the batch size to use: ``batch_size`` (default ``DEFAULT_BATCH_SIZE``) for the
    minibatch estimator, else None."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; valid kernels: {', '.join(KERNELS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is unknown; valid estimators: "
                         f"{', '.join(ESTIMATORS)}")
    if kernel == "rbf" and not (finite_real(threshold) and threshold > 0):
        raise ValueError(f"threshold={threshold!r} must be a positive number")
    if estimator != "minibatch":
        return None
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if not finite_real(batch_size) or int(batch_size) != batch_size or batch_size < 4:
        raise ValueError(f"estimator='minibatch' needs batch_size=N, an integer >= 4 (rows "
                         f"per batch; the unbiased HSIC estimator needs 4), got {batch_size!r}")
    return int(batch_size)


def estimator_of(debiased: Any) -> str:
    """``"debiased"`` or ``"biased"`` for the ``debiased`` flag; ValueError unless it is a bool
    (or 0, 1): a str is true, so ``"False"`` would silently mean the unbiased estimator."""
    if not (isinstance(debiased, (bool, np.bool_, numbers.Integral)) and debiased in (0, 1)):
        raise ValueError(f"debiased={debiased!r} must be True or False (the unbiased HSIC "
                         "estimator, or the biased one)")
    return "debiased" if debiased else "biased"


def check_medians(median_sqdist_a: Any, median_sqdist_b: Any) -> None:
    """ValueError unless each is a sequence of :func:`finite_real` numbers, one layer's median
    squared distance each (an infinite one: an all-ones Gram, CKA NaN, silently)."""
    meds = (median_sqdist_a, median_sqdist_b)
    if not (all(np.ndim(m) == 1 for m in meds) and all(finite_real(v) for m in meds for v in m)):
        raise ValueError("kernel='rbf' needs fixed bandwidths: pass median_sqdist_a and "
                         "median_sqdist_b, one per layer (see repsim.cka.rbf_bandwidths); "
                         f"got median_sqdist_a={median_sqdist_a!r}, _b={median_sqdist_b!r}")


def min_rows(estimator: str) -> int:
    """The fewest rows ``estimator`` is defined on: biased HSIC 2, the unbiased estimator 4."""
    return 2 if estimator == "biased" else 4


def check_rows(n: int, estimator: str, batch: int | None = None) -> None:
    """ValueError unless ``n`` rows (of batch number ``batch``, if given) are enough for
    ``estimator`` (:func:`min_rows`)."""
    if n < (need := min_rows(estimator)):
        got = f", got n={n}" if batch is None else f" per batch; batch {batch} has {n}"
        raise ValueError(f"estimator={estimator!r} needs at least {need} rows{got}")


def centring(hollow: bool, m: int) -> tuple[float, float]:
    """``(a, b)`` of the centring ``C_ij = K_ij - a (r_i + r_j) + b s`` of an ``m x m`` Gram:
    ``H K H``, or U-centring (``hollow``: the diagonal zeroed first)."""
    return (1.0 / (m - 2), 1.0 / ((m - 1) * (m - 2))) if hollow else (1.0 / m, 1.0 / m**2)


def hsic_scale(hollow: bool, m: int) -> float:
    """``<C(K_a), C(K_b)>`` of ``m`` rows times this is the HSIC the engine sums: ``1 / m^2``,
    or unbiased ``1 / (m(m - 3))``, 0 below 4 rows (the engine drops such a batch)."""
    if hollow:
        return 1.0 / (m * (m - 3)) if m >= 4 else 0.0
    return 1.0 / m**2


def block_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` row ranges of ``size`` rows (the last may be shorter)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def minibatches(n: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """The minibatch estimator's batches: sorted ``int64`` row indices (for h5py reads).

    One seeded permutation deals the rows out (Nguyen, Raghu & Kornblith 2021 draw batches
    without replacement), so a batch is a random sample even of rows sorted by class, as in
    stores (consecutive rows would measure within-class similarity only); the same arguments
    give both models the same batches. A last batch of fewer than 4 rows is left out."""
    if not is_whole(seed, 0):  # None would draw other batches every time, unrecorded
        raise ValueError(f"batch_seed={seed!r} must be a whole number >= 0 (the seed of the "
                         "random batches)")
    if not is_whole(n, 0):
        raise ValueError(f"n={n!r} must be a whole number >= 0 (the rows to deal out)")
    # A batch_size below 4 would list no batch at all: every one left out.
    batch_size = check_options("linear", "minibatch", 1.0, batch_size)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[a:b]) for a, b in block_bounds(n, batch_size) if b - a >= 4]


def batches(n: int, estimator: str, batch_size: int | None, seed: int) -> list:
    """The row sets an estimator sums over: :func:`minibatches`, or ``[None]`` (all rows).
    Warns when they leave rows out: compare and layer_sketch both deal their rows here, and a
    store's cached sketches repeat it (:func:`repsim.errors.recorded`)."""
    if estimator != "minibatch":
        return [None]
    out = minibatches(n, batch_size, seed)  # first: it checks the arguments
    if 0 < n % batch_size < 4:
        warnings.warn(f"dropping {n % batch_size} of {n} rows (the last, short random batch): "
                      "the unbiased HSIC estimator needs at least 4; choose a batch_size that "
                      "leaves >= 4", RuntimeWarning, stacklevel=3)
    return out


def sample_rows(n: int, k: int) -> np.ndarray:
    """A fixed (seed 0), sorted sample of ``min(n, k)`` row indices."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))


def bandwidth_rows(n: int, estimator: str) -> np.ndarray | None:
    """Rows fixing each layer's RBF bandwidth: a fixed sample for minibatch CKA, else None (all)."""
    return sample_rows(n, BANDWIDTH_SAMPLE) if estimator == "minibatch" else None


def sketch_size(n: int, estimator: str, batch_size: int | None = None) -> int:
    """Length of one layer's sketch vector (float64 entries), for :func:`repsim.cka.layer_sketch`'s
    settings (``batch_size`` None: its default)."""
    batch_size = check_options("linear", estimator, 1.0, batch_size)
    if estimator == "biased":
        return n * (n + 1) // 2
    sizes = [b - a for a, b in block_bounds(n, batch_size if estimator == "minibatch" else n)]
    return sum(m * (m - 1) // 2 for m in sizes if m >= 4)


def normalise(cross: np.ndarray, self_a: np.ndarray, self_b: np.ndarray) -> np.ndarray:
    """CKA ``cross / sqrt(self_a self_b)`` ``(..., La, Lb)`` from HSIC ``(..., La, Lb)``,
    ``(..., La)``, ``(..., Lb)``; never clamped, NaN where a self term is not positive or
    overflowed (then with a warning: a finite cross term over an infinite one would read 0)."""
    a, b = self_a[..., :, None], self_b[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = cross / sqrt_product(np.maximum(a, 0), np.maximum(b, 0))
    over = ~np.isfinite(a) | ~np.isfinite(b)  # inputs are finite: an overflow (inf, inf - inf)
    if over.any():
        warnings.warn("a layer's HSIC with itself overflows float64 (features of magnitude "
                      "above about 1e75?), so its CKA values are NaN; divide its features by a "
                      "constant (CKA does not depend on scale)", RuntimeWarning, stacklevel=3)
    out[~(a > 0) | ~(b > 0) | over] = np.nan
    return out


def sqrt_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sqrt(a b)`` of non-negative arrays, from mantissas and exponents: ``a b`` under- or
    overflows where each HSIC does not, and ``sqrt(a) sqrt(b)`` is not exactly ``a`` for
    ``a == b`` (a self-similarity of exactly 1) as this is."""
    (ma, ea), (mb, eb) = np.frexp(a), np.frexp(b)
    odd = (ea + eb) % 2
    return np.ldexp(np.sqrt(ma * mb * 2.0**odd), (ea + eb - odd) // 2)


def cka_from_sketches(sketches_a: Sequence[Any], sketches_b: Sequence[Any]) -> np.ndarray:
    """``(La, Lb)`` CKA from per-layer sketches (1-D float64 numpy arrays or torch tensors)
    made with the same settings and rows; the same sequence twice gives each layer exactly 1."""
    def stack(sketches, side):  # without importing torch (see the module's docstring)
        out = np.stack([np.asarray(s.detach().cpu() if hasattr(s, "detach") else s,
                                   dtype=np.float64) for s in sketches])
        if out.ndim != 2:  # one sketch, not [sketch], stacks its entries: ndim 1
            raise ValueError(f"sketches_{side} must be a sequence of 1-D sketches, e.g. "
                             f"[layer_sketch(x)]; they stack to shape {out.shape}")
        return out

    sa = stack(sketches_a, "a")
    sb = sa if sketches_b is sketches_a else stack(sketches_b, "b")
    if sa.shape[1] != sb.shape[1]:
        raise ValueError(f"sketches of length {sa.shape[1]} and {sb.shape[1]} come from "
                         "different rows or settings")
    cross = sa @ sb.T
    if sb is sa:  # self terms as summed for the cross terms: a layer with itself gives 1
        own_a = own_b = cross.diagonal().copy()
    else:
        own_a, own_b = np.einsum("ij,ij->i", sa, sa), np.einsum("ij,ij->i", sb, sb)
    warn_underflow([own_a, own_b], [sa.any(1), sb.any(1)])  # all zeros: a dead layer
    return normalise(cross, own_a, own_b)


# Below this off-diagonal Gram mass per row (the diagonal is 1), an RBF Gram is nearly the
# identity: biased CKA tends to 1, unbiased HSIC to 0 (NaN once it underflows), whatever the
# data. Measured on Gaussian data (n = 200, p = 10 to 1,000): threshold 0.1 gives 1e-14 to
# 8e-4, 0.5 gives 27-33, 1.0 about 120; the median distance sits at exp(-1 / 2 threshold^2).
IDENTITY_MASS = 1e-3


def warn_identity(threshold: float, layers: str, stacklevel: int) -> None:
    """Warn that ``threshold`` makes the RBF Grams of ``layers`` (their description) nearly the
    identity (:data:`IDENTITY_MASS`)."""
    warnings.warn(f"threshold={threshold:g} makes the RBF Grams of {layers} nearly the "
                  f"identity (off-diagonal mass per row below {IDENTITY_MASS:g} of the "
                  "diagonal): CKA with them no longer depends on the data; use a threshold "
                  "between 0.5 and 2 (1, the default, is the median distance)",
                  RuntimeWarning, stacklevel=stacklevel)


def warn_identity_layers(threshold: float, layers: Sequence[Sequence[str]],
                         per_row: Sequence[np.ndarray], dead: Sequence[Sequence[Any]],
                         stacklevel: int) -> None:
    """One :func:`warn_identity` for all live layers (names per side, one side when B is A)
    whose Grams' off-diagonal mass ``per_row`` is below :data:`IDENTITY_MASS`."""
    bad = [f"{nm!r} ({v:.1e})" for side, vs, ds in zip(layers, per_row, dead)
           for nm, v, why in zip(side, vs, ds) if v < IDENTITY_MASS and not why]
    if bad:
        warn_identity(threshold, f"layers {', '.join(bad[:4])}{' ...' * (len(bad) > 4)}",
                      stacklevel + 1)


def check_spread(name: str, sq_max: float, median: float | None = None) -> None:
    """ValueError unless layer ``name``'s RBF squared distances fit float64: ``sq_max``, its
    largest squared centred row norm, bounds them by ``4 sq_max``, which must not overflow;
    its ``median`` squared distance, if given, must not underflow (a subnormal median, or 0
    from squares that are all subnormal: not a zero bandwidth of identical rows)."""
    tiny, top, norm = np.finfo(np.float64).tiny, np.finfo(np.float64).max / 4, \
        f"its largest squared centred row norm is {sq_max:.1e}"
    if not sq_max <= top:
        what, fix = f"overflow float64 ({norm}, above {top:.1e})", "divide"
    elif median is not None and median < tiny and (median > 0 or sq_max < tiny):
        what, fix = f"underflow float64 (their median is {median:.1e}, below {tiny:.1e}; {norm})", \
            "multiply"
    else:
        return
    raise ValueError(f"layer {name!r}: squared distances between its rows {what}, so its RBF "
                     f"CKA cannot be computed; {fix} its features by a constant (RBF CKA does "
                     "not depend on their scale)")


# Why a layer's CKA values are NaN; the engine (repsim.cka) and cached sketches say the same.
ZERO_VARIANCE = "has zero variance (every row is identical)"
ZERO_BANDWIDTH = "has a zero median squared distance, so its RBF bandwidth is zero"
IDENTITY_GRAMS = "has RBF Grams that are numerically the identity at this threshold"


def warn_dead(layers: Sequence[str], sketches: Sequence[np.ndarray],
              medians: Sequence[float] | None, stacklevel: int = 2) -> None:
    """Warn, as the engine does, of each layer whose sketch is all zeros; ``medians`` (RBF
    only) tell why: none, zero variance; zero, no bandwidth; else its Grams are the identity
    (U-centred, the identity is zero)."""
    for name, sk, med in zip(layers, sketches, medians or [None] * len(layers)):
        if not np.any(sk):
            why = (ZERO_VARIANCE if med is None else ZERO_BANDWIDTH if not med > 0 else
                   IDENTITY_GRAMS)
            warnings.warn(f"layer {name!r} {why}; its CKA values are NaN", RuntimeWarning,
                          stacklevel=stacklevel + 1)


def warn_underflow(own: Sequence[np.ndarray], alive: Sequence[Any]) -> None:
    """Warn if a live layer's HSIC with itself (``own``, per side) is below float64's smallest
    normal number, the way :func:`normalise` warns of an overflow: its CKA is NaN or inexact."""
    if any(np.any(np.asarray(x)[np.asarray(ok, dtype=bool)] < np.finfo(np.float64).tiny)
           for x, ok in zip(own, alive)):
        warnings.warn("a layer's HSIC with itself underflows float64 (features of magnitude "
                      "below about 1e-75?), so its CKA values are NaN or inexact; multiply its "
                      "features by a constant (CKA does not depend on scale)", RuntimeWarning,
                      stacklevel=3)


def participation_ratios(sketches: list[np.ndarray], n: int) -> np.ndarray:
    """``(tr C)^2 / ||C||_F^2`` per layer from biased sketches (C's upper triangle by rows)."""
    diagonal = np.arange(n) * n - np.arange(n) * (np.arange(n) - 1) // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # a dead layer: NaN, as in stats
        return np.array([sk[diagonal].sum() ** 2 / (sk @ sk) for sk in sketches])
