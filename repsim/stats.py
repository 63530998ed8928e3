"""How much to trust a CKA value: standard errors, permutation nulls, effective dimensionality.

All in float64 on the stacked Grams ``(L, m, m)`` of one batch of rows (all ``n`` rows for the
biased and debiased estimators, each random batch for minibatch CKA):

- **Delete-one jackknife over images, in closed form.** Removing image ``i`` changes a Gram's
  inner product, row sums and total by rank-one terms, so every leave-one-out HSIC of every
  layer pair comes from three batched products, O(m^2) per pair (:func:`_closed_forms`).
  These add up row by row, so the Grams are read in strips within a memory budget
  (:func:`strip_rows`, :class:`_Side`). With minibatches the unit is a batch.
  No bootstrap: resampling with replacement duplicates images, which both Grams see as
  perfectly aligned pairs (independent Gaussian data, n = 300, p = 3,000: debiased CKA
  -0.0002, on a bootstrap resample 0.91).
- **Permutation null.** Re-pairing the images of B with those of A re-indexes B's centred
  Gram: ``<C_a, P C_b P'>``, no new Gram (:func:`repsim.permnull.permutation_null`;
  minibatch CKA permutes within each batch). It needs every batch's whole centred Grams
  (:func:`check_null_fits`).
- **Participation ratio** ``PR = (tr HKH)^2 / ||HKH||_F^2`` per layer (effective
  dimensionality, at most ``m - 1``): the biased estimator's permutation-null mean is exactly
  ``sqrt(PR_a PR_b) / (m - 1)``, about 0.91 for isotropic features with ``p = 10 m``
  (Murphy, Zylberberg & Fyshe 2024); the unbiased estimators' is 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from repsim import sketch
from repsim.cka import centre, default_memory_budget, gram
from repsim.errors import UserError, finite_real, is_whole, size_text
from repsim.features import centred_rows, feature_set
from repsim.permnull import permutation_null
from repsim.sketch import CKAResult, block_bounds, check_options, check_rows, minibatches, normalise

# minibatch CKA gets a delete-one-batch standard error from this many batches on
MIN_JACKKNIFE_BATCHES = 20


def grams(mats: list[Any], rows: np.ndarray | None = None, *, kernel: str = "linear",
          sigma2: list[float] | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Stacked Grams ``(L, m, m)`` float64 of the rows ``rows`` (default all) of each
    ``(n, p)`` matrix in ``mats``, features centred first (the linear Gram is then ``HKH``).
    RBF needs ``sigma2``, the squared bandwidth per layer (``threshold^2`` times
    :func:`repsim.cka.rbf_bandwidths`), and gives the Gram less 1, as the engine does."""
    if kernel == "rbf" and not _per_layer(sigma2, len(mats)):
        raise ValueError(f"kernel='rbf' needs sigma2, a squared bandwidth per matrix; got "
                         f"{sigma2!r} for {len(mats)} matrices")
    return torch.stack([_gram(centred_rows(m, rows, torch.device(device)), kernel,
                              None if sigma2 is None else sigma2[i])
                        for i, m in enumerate(mats)])


def _per_layer(sigma2: Any, layers: int) -> bool:
    """Whether ``sigma2`` holds a finite real number per layer (inf: an all-ones Gram, NaN)."""
    return np.ndim(sigma2) == 1 and len(sigma2) == layers and all(map(finite_real, sigma2))


def _gram(x: torch.Tensor, kernel: str, sigma2: float | None, s0: int = 0,
          s1: int | None = None) -> torch.Tensor:
    """Rows ``s0:s1`` (default all) ``(s, m)`` of one layer's Gram from its centred features,
    as the engine uses it (``minus_one``)."""
    s1 = len(x) if s1 is None else s1
    if kernel == "rbf" and not sigma2 > 0:  # no bandwidth: the engine's dead layer (CKA NaN)
        return x.new_zeros(s1 - s0, len(x))
    y = None if s1 - s0 == len(x) else x  # None: the whole Gram, exactly symmetric
    return gram(x[s0:s1], y, kernel=kernel, sigma2=sigma2, minus_one=True)


def hsic(ka: torch.Tensor, kb: torch.Tensor, hollow: bool) -> torch.Tensor:
    """``<C(K_a), C(K_b)>`` ``(La, Lb)`` of stacked Grams: biased (``HKH``) or, with
    ``hollow``, U-centred (unbiased HSIC times ``m(m - 3)``)."""
    return _of_grams(ka, kb, hollow)[0]


def leave_one_out(ka: torch.Tensor, kb: torch.Tensor, hollow: bool) -> torch.Tensor:
    """:func:`hsic` on all rows but ``i``, for every ``i``: ``(m, La, Lb)``."""
    return _of_grams(ka, kb, hollow)[1]


def _of_grams(ka: torch.Tensor, kb: torch.Tensor, hollow: bool):
    # Float64 copies, whatever the Grams' dtype: the closed forms cancel large sums.
    sa, sb = (_Side.of_grams(k.to(torch.float64, copy=True), hollow) for k in (ka, kb))
    return _closed_forms(*_moments(sa, sb)[0], hollow)


class _Side:
    """One side's ``L`` layers on a batch of ``m`` rows, read as row strips ``(L, s, m)`` of
    their Grams: held whole ``(L, m, m)``, or made from the centred features when asked.
    ``diag``, ``rows`` ``(L, m)``: the Grams' diagonal and row sums as the estimator uses them
    (``hollow``: zero diagonal); ``full_diag``: the diagonal before that."""

    def __init__(self, hollow: bool, m: int, strip: int, k: torch.Tensor | None = None,
                 x: list[torch.Tensor] | None = None, kernel: str = "linear",
                 sigma2: list[float | None] | None = None) -> None:
        self.hollow, self.m, self.strip = hollow, m, min(strip, m)
        self.k, self.x, self.kernel, self.sigma2 = k, x, kernel, sigma2

    @classmethod
    def of_grams(cls, k: torch.Tensor, hollow: bool) -> _Side:
        """From whole Grams ``(L, m, m)``, kept (and, ``hollow``, their diagonal zeroed)."""
        side = cls(hollow, k.shape[1], k.shape[1], k)
        side._set_sums(k.diagonal(dim1=1, dim2=2).clone(), k.sum(2))
        return side

    @classmethod
    def of_features(cls, xs: list[torch.Tensor], kernel: str, sigma2: list[float | None],
                    hollow: bool, strip: int) -> _Side:
        """From centred features ``(m, p_l)``, Grams in strips of ``strip`` rows. Row sums:
        linear ``K 1 = X (X' 1)``; RBF a pass over the strips of its own."""
        side = cls(hollow, len(xs[0]), strip, None, xs, kernel, sigma2)
        if kernel == "linear":
            side._set_sums(torch.stack([(x * x).sum(1) for x in xs]),
                           torch.stack([x @ x.sum(0) for x in xs]))
            return side
        d, r = [], []
        for s0, s1 in block_bounds(side.m, side.strip):
            k = side._raw(s0, s1)
            d.append(k[:, :, s0:s1].diagonal(dim1=1, dim2=2).clone())
            r.append(k.sum(2))
        side._set_sums(torch.cat(d, 1), torch.cat(r, 1))
        return side

    def _set_sums(self, d: torch.Tensor, r: torch.Tensor) -> None:
        self.full_diag = d
        self.diag = torch.zeros_like(d) if self.hollow else d
        self.rows = r - d if self.hollow else r
        if self.hollow and self.k is not None:
            self.k.diagonal(dim1=1, dim2=2).zero_()

    def _raw(self, s0: int, s1: int) -> torch.Tensor:
        """Rows ``s0:s1`` of the full Grams (diagonal kept), from the features."""
        return torch.stack([_gram(x, self.kernel, sig, s0, s1)
                            for x, sig in zip(self.x, self.sigma2)])

    def rows_of(self, s0: int, s1: int) -> torch.Tensor:
        """Rows ``s0:s1`` of the Grams as used: ``(L, s1 - s0, m)``."""
        if self.k is not None:
            return self.k[:, s0:s1]
        k = self._raw(s0, s1)
        if self.hollow:
            k[:, :, s0:s1].diagonal(dim1=1, dim2=2).zero_()
        return k


def _products(ka: torch.Tensor, kb: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor,
              pairs: bool) -> tuple[torch.Tensor, ...]:
    """``(K_a o K_b 1)_i``, ``(K_a r_b)_i``, ``(K_b r_a)_i`` for the rows ``i`` of strips
    ``ka`` ``(La, s, m)``, ``kb`` ``(Lb, s, m)`` (``ra``, ``rb``: row sums ``(L, m)``): each
    ``(s, La, Lb)``, or ``(s, L)`` for ``pairs=False`` (``kb`` is ``ka``, each layer alone)."""
    o, b = ("ab", "b") if pairs else ("a", "a")
    return (torch.einsum(f"aij,{b}ij->i{o}", ka, kb), torch.einsum(f"aij,{b}j->i{o}", ka, rb),
            torch.einsum(f"{b}ij,aj->i{o}", kb, ra))


def _moments(sa: _Side, sb: _Side) -> list[tuple[torch.Tensor, ...]]:
    """The closed forms' arguments for A with B, A with itself, B with itself, strip by strip:
    ``(rowdot, K_a r_b, K_b r_a, d_a, d_b, r_a, r_b)``, each (broadcastable to) ``(m, La, Lb)``,
    ``(m, La)`` or ``(m, Lb)``."""
    la, lb, m, ra, rb = len(sa.rows), len(sb.rows), sa.m, sa.rows, sb.rows
    # Filled in place: small results allocated between the strips' large temporaries would
    # fragment the heap (m = 4,000, 5 layers, strips for 64 MiB: peak RSS 1.1 GiB, not 0.14).
    out = [[ra.new_empty(m, *shape) for _ in range(3)] for shape in ((la, lb), (la,), (lb,))]
    for s0, s1 in block_bounds(m, min(sa.strip, sb.strip)):
        ka, kb = sa.rows_of(s0, s1), sb.rows_of(s0, s1)
        for dst, args in zip(out, ((ka, kb, ra, rb, True), (ka, ka, ra, ra, False),
                                   (kb, kb, rb, rb, False))):
            for x, got in zip(dst, _products(*args)):
                x[s0:s1] = got
        del ka, kb  # before the next strip is made
    da, db, ra, rb = sa.diag.T, sb.diag.T, ra.T, rb.T  # (m, L)
    return [(*out[0], da[:, :, None], db[:, None, :], ra[:, :, None], rb[:, None, :]),
            (*out[1], da, da, ra, ra), (*out[2], db, db, rb, rb)]


def _closed_forms(rowdot: torch.Tensor, kr_ab: torch.Tensor, kr_ba: torch.Tensor,
                  da: torch.Tensor, db: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor,
                  hollow: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``<C(K_a), C(K_b)>`` ``(...)`` on all ``m`` rows and without row ``i`` ``(m, ...)``,
    from :func:`_moments` (``rowdot = (K_a o K_b 1)_i``; ``d``, ``r``: diagonals and row sums),
    and the size ``(...)`` of the terms that the centring identity cancels (its rounding).

    With ``s`` the total and ``u = r_a . r_b``, removing row ``i`` gives ``<K_a, K_b> - 2
    (K_a o K_b 1)_i + d_ai d_bi``, ``s - 2 r_i + d_i`` and ``u - (K_a r_b)_i - (K_b r_a)_i +
    (K_a o K_b 1)_i - (r_ai - d_ai)(r_bi - d_bi)``; the centring constants are those of
    ``m - 1`` rows."""
    m = len(rowdot)
    dot, u, sa, sb = rowdot.sum(0), (ra * rb).sum(0), ra.sum(0), rb.sum(0)
    a, b = sketch.centring(hollow, m)
    whole = dot - 2 * a * u + b * sa * sb
    size = dot.abs() + 2 * a * u.abs() + b * (sa * sb).abs()
    a, b = sketch.centring(hollow, m - 1)
    dot_i = dot - 2 * rowdot + da * db
    u_i = u - kr_ab - kr_ba + rowdot - (ra - da) * (rb - db)
    return whole, dot_i - 2 * a * u_i + b * (sa - 2 * ra + da) * (sb - 2 * rb + db), size


def jackknife_se(loo: np.ndarray) -> np.ndarray:
    """Delete-one jackknife standard error ``sqrt((g-1)/g sum (t_i - mean t)^2)`` over the
    first axis of ``loo`` ``(g, ...)`` (the estimates without unit ``i``); NaN for ``g < 2``."""
    g = loo.shape[0]
    if g < 2:  # one estimate has no spread; none (g = 0) would divide by zero
        return np.full(loo.shape[1:], np.nan)
    return ((g - 1) / g * ((loo - loo.mean(0)) ** 2).sum(0)) ** 0.5


def participation_ratio(k: torch.Tensor) -> torch.Tensor:
    """``(tr HKH)^2 / ||HKH||_F^2`` of stacked Grams ``(L, m, m)``: ``(L,)``."""
    c = torch.stack([centre(x.to(torch.float64, copy=True), "biased") for x in k])
    tr = c.diagonal(dim1=1, dim2=2).sum(1)
    return tr**2 / (c * c).sum((1, 2))


def _participation(side: _Side, sq: torch.Tensor) -> torch.Tensor:
    """:func:`participation_ratio` ``(L,)`` of a side's full Grams, from its sums and ``sq``
    ``(L,)``, the ``<K, K>`` of its Grams as used: ``||HKH||^2 = <K, K> - 2 |r|^2 / m +
    s^2 / m^2`` and ``tr HKH = tr K - s / m``."""
    d, r, m = side.full_diag, side.rows, side.m
    if side.hollow:  # the diagonal back
        sq, r = sq + (d * d).sum(1), r + d
    s = r.sum(1)
    return (d.sum(1) - s / m) ** 2 / (sq - 2 / m * (r * r).sum(1) + s**2 / m**2)


@dataclass
class Calibration:
    """Per-cell uncertainty of a CKA matrix ``(La, Lb)`` and per-layer dimensionality."""

    matrix: np.ndarray
    se: np.ndarray  # jackknife standard error
    se_method: str  # "delete-one-image" or, for >= 20 minibatches, "delete-one-batch"
    pr_a: np.ndarray  # participation ratio per layer (mean over batches for minibatch)
    pr_b: np.ndarray
    biased_null_mean: np.ndarray  # sqrt(PR_a PR_b) / (m - 1), m the rows per Gram
    rows: np.ndarray  # (n',) the row numbers of ``loo``
    loo: np.ndarray  # (n', La, Lb): CKA without row ``rows[k]``
    # (La, Lb): a bound on float64 rounding in ``matrix``. An HSIC is a difference of sums that
    # can far exceed it (RBF: the Grams' mean): eps times the cell's condition number (those
    # sums over the HSICs), times m, the length of a row sum (the recursive-summation bound).
    rounding: np.ndarray
    null: dict[str, np.ndarray] = field(default_factory=dict)  # p_value, null_mean, null_q95

    def influence(self, i: int, j: int, k: int) -> list[tuple[int, float]]:
        """The ``k`` rows whose removal moves cell ``(i, j)`` most: ``(row, change)``; none
        for a NaN cell (a dead layer), which no row moves."""
        if not is_whole(k, 0):  # a negative k would slice off the end: all rows but -k
            raise ValueError(f"k={k!r} must be a whole number >= 0 (how many rows to list)")
        if np.isnan(self.matrix[i, j]):
            return []
        d = self.loo[:, i, j] - self.matrix[i, j]
        # NaN: a layer constant without that row, which thus decides the cell: ranked first
        top = np.argsort(-np.nan_to_num(np.abs(d), nan=np.inf), kind="stable")[:k]
        return [(int(self.rows[r]), float(d[r])) for r in top]


# Whole Grams are formed when this many copies of them fit the memory budget (the Grams,
# the products' reordered copies, headroom); otherwise strips of as many rows as fit.
WORK_COPIES = 4
# The permutation null holds every batch's centred Grams and its own reordered copies of
# them: peak memory about this many times the Grams (2.6 measured at n = 2,000, 3 + 2 layers).
NULL_COPIES = 3


def strip_rows(m: int, layers: int, budget: int, strip: int | None = None) -> int:
    """Rows per Gram strip of a batch of ``m`` rows of ``layers`` layers within ``budget``
    bytes: ``m`` (whole Grams) when :data:`WORK_COPIES` of them fit, else as many as fit, at
    least 16. Memory: ``WORK_COPIES * 8 * layers * strip * m`` bytes, plus the leave-one-out
    values ``(m, La, Lb)`` and every layer's centred features ``(m, p)``. ``strip``: the
    caller's own choice instead, checked (a negative one gave NaN standard errors)."""
    if strip is not None and not is_whole(strip, 1):
        raise ValueError(f"strip={strip!r} must be a whole number >= 1 (rows per Gram strip)")
    return strip or min(m, max(16, budget // (WORK_COPIES * 8 * layers * m)))


def check_null_fits(permutations: int, estimator: str, batches: list[np.ndarray],
                    layers: int, budget: int) -> None:
    """Refuse (:class:`UserError`) a permutation null whose centred Grams, every batch's at
    once (:func:`permutation_null`), would not fit ``budget`` bytes."""
    need = NULL_COPIES * 8 * layers * sum(len(r) ** 2 for r in batches)
    if need <= budget:
        return
    m = max(len(r) for r in batches)
    fix = ("a smaller batch_size= or fewer images (n=)" if estimator == "minibatch" else
           "estimator='minibatch' (batches of 1,024 rows) or fewer images (n=)")
    raise UserError(f"permutations={permutations} needs every batch's centred Grams in memory, "
                    f"about {size_text(need)} for {layers} layers of {m} rows per batch; "
                    f"valid: at most the memory budget, {size_text(budget)} (a quarter of "
                    f"the device's memory unless memory_budget is given); fix: use {fix}, or "
                    "permutations=0 for standard errors alone")


def _side(name: str, mats: list[Any], rows: np.ndarray | None, m: int, kernel: str,
          sigma2: list[float] | None, hollow: bool, strip: int, device: torch.device) -> _Side:
    """One side (``name``: its argument) of a batch of ``m`` rows ``rows`` (None: all): whole
    Grams, one layer at a time, when ``strip >= m``, else every layer's centred features.
    NaN or infinity raise ValueError (CKA would be NaN, silently)."""
    sigma2, xs = sigma2 or [None] * len(mats), []
    for i, x in enumerate(mats):
        xs.append(centred_rows(x, rows, device))
        if not bool(torch.isfinite(xs[-1].sum(0)).all()):  # one reduction sees every value
            raise ValueError(f"{name}[{i}] has non-finite values (NaN or infinity); check the "
                             "activations (overflow in float16 storage?) before computing CKA")
        if strip >= m:
            xs[-1] = _gram(xs[-1], kernel, sigma2[i])
    if strip >= m:
        return _Side.of_grams(torch.stack(xs), hollow)
    return _Side.of_features(xs, kernel, sigma2, hollow, strip)


def _batch(sides: list[_Side], hollow: bool):
    """One batch's unscaled HSIC terms ``[(La, Lb), (La,), (Lb,)]``, the same without each row
    (``(m, ...)``), their sizes (:func:`_closed_forms`), and participation ratios."""
    moments = _moments(*sides)
    pr = [_participation(s, x[0].sum(0)) for s, x in zip(sides, moments[1:])]
    forms = zip(*(_closed_forms(*x, hollow) for x in moments))
    return *([x.cpu().numpy() for x in f] for f in forms), pr


def _jackknife(terms: list[list[np.ndarray]], loos: list[list[np.ndarray]]):
    """``(matrix, se, se_method, loo, dead)`` from each batch's HSIC terms and their
    leave-one-out (:func:`_batch`, scaled); ``dead``: ``(side, layer, k)`` for each live layer
    constant without loo row ``k`` (its HSIC with itself not positive, so its loo CKA NaN)."""
    per_batch = [np.stack(x) for x in zip(*terms)]  # (B, La, Lb), (B, La), (B, Lb)
    total = [x.sum(0) for x in per_batch]
    # Without image i of batch b: the totals with batch b's terms replaced by its leave-one-out.
    parts = [[t - x[b] + y for t, x, y in zip(total, per_batch, loo_b)]
             for b, loo_b in enumerate(loos)]
    loo = np.concatenate([normalise(*p) for p in parts])
    dead = [(side, int(layer), int(k)) for side in (1, 2) for k, layer in zip(*np.nonzero(
        ~(np.concatenate([p[side] for p in parts]) > 0) & (total[side] > 0)))]
    if len(terms) >= MIN_JACKKNIFE_BATCHES:
        se = jackknife_se(normalise(*(t - x for t, x in zip(total, per_batch))))
        return normalise(*total), se, "delete-one-batch", loo, dead
    return normalise(*total), jackknife_se(loo), "delete-one-image", loo, dead


def _warn_constant_without(dead: list[tuple[int, int, int]], rows: np.ndarray,
                           names: tuple[list[str], list[str]], method: str) -> None:
    """One warning for the layers that :func:`_jackknife` found constant without one row."""
    if not dead:
        return
    side, layer, k = dead[0]
    se = ", and so its standard errors," if method == "delete-one-image" else ""
    more = f" ({len(dead) - 1} more such layer and row)" * (len(dead) > 1)
    warnings.warn(f"layer {names[side - 1][layer]} has no variance without row {rows[k]}, to "
                  "float64 precision (that row holds it all), so its CKA without the row is "
                  f"undefined: its leave-one-out "
                  f"values{se} are NaN{more}; influence lists such a row first, the most "
                  "influential", RuntimeWarning, stacklevel=3)


def _check_jackknife_rows(se: np.ndarray, m: int, estimator: str) -> np.ndarray:
    """``se`` of one batch of ``m`` rows; NaN and a warning if CKA of ``m - 1`` says nothing."""
    if m - 1 >= (need := 3 if estimator == "biased" else 4):
        return se
    why = "2 rows give 1 whatever the data" if need == 3 else "unbiased HSIC needs 4 rows"
    warnings.warn(f"jackknife standard errors are NaN: without one of its {m} rows a cell has "
                  f"{m - 1}, too few for {estimator} CKA ({why}); use at least {need + 1} rows"
                  + (f" per batch (batch_size={need + 1} or more)" * (estimator == "minibatch")),
                  RuntimeWarning, stacklevel=3)
    return np.full_like(se, np.nan)


def _rounding(terms: list[list[np.ndarray]], sizes: list[list[np.ndarray]],
              cka: np.ndarray, m: int) -> np.ndarray:
    """:attr:`Calibration.rounding` ``(La, Lb)`` from each batch's HSIC terms and sizes."""
    (hab, haa, hbb), (sab, saa, sbb) = ([sum(x) for x in zip(*t)] for t in (terms, sizes))
    with np.errstate(divide="ignore", invalid="ignore"):  # a dead layer: NaN, like its CKA
        cond = (sab / np.outer(np.sqrt(haa), np.sqrt(hbb))
                + np.abs(cka) * (saa / haa)[:, None] / 2 + np.abs(cka) * (sbb / hbb)[None] / 2)
    return np.finfo(np.float64).eps * m * cond


def calibrate(mats_a: list[Any], mats_b: list[Any], *, estimator: str = "debiased",
              kernel: str = "linear", sigma2_a: list[float] | None = None,
              sigma2_b: list[float] | None = None, batches: list[np.ndarray] | None = None,
              permutations: int = 0, seed: int = 0, device: str | torch.device = "cpu",
              memory_budget: int | None = None, strip: int | None = None,
              names: tuple[list[str], list[str]] | None = None) -> Calibration:
    """CKA of every layer pair of ``mats_a``, ``mats_b`` (lists of ``(n, p)`` matrices, rows
    aligned) with jackknife standard errors, participation ratios and, with ``permutations``,
    the permutation null. ``batches``: minibatch CKA's row sets (default: all rows). Removing
    an image changes only its batch's terms, so the delete-one-image jackknife is closed-form
    for every estimator. Memory: Gram strips of ``strip`` rows (default :func:`strip_rows` of
    ``memory_budget`` bytes, by default :func:`repsim.cka.default_memory_budget`); the null
    needs every batch's whole Grams, ``(La + Lb) m^2`` float64 each, refused beyond it.
    ``names``: the layers' names for warnings (default ``mats_a[0]``, ...)."""
    mats_a, mats_b, n = _checked(mats_a, mats_b, estimator, kernel, sigma2_a, sigma2_b)
    if not (is_whole(permutations, 0) and is_whole(seed, -2**63) and seed < 2**64):
        raise ValueError(f"permutations={permutations!r} and seed={seed!r} must be integers, "
                         "permutations >= 0 (the size of the null; 0: none), seed -2**63 to 2**64")
    seed, hollow, dev = int(seed), estimator != "biased", torch.device(device)
    batches = batches or [np.arange(n)]
    for i, rows in enumerate(batches):  # a shorter batch would divide by zero in the centring
        check_rows(len(rows), estimator, i)
    budget, layers = default_memory_budget(dev, memory_budget), len(mats_a) + len(mats_b)
    if permutations:
        check_null_fits(permutations, estimator, batches, layers, budget)
    terms, loos, sizes, pr_a, pr_b, ca, cb = [], [], [], 0.0, 0.0, [], []
    for rows in batches:
        m = len(rows)
        each = m if permutations else strip_rows(m, layers, budget, strip)
        every = m == n and np.array_equal(rows, np.arange(n))  # read without an index
        sides = [_side(nm, mats, None if every else rows, m, kernel, sig, hollow, each, dev)
                 for nm, mats, sig in (("mats_a", mats_a, sigma2_a), ("mats_b", mats_b, sigma2_b))]
        whole, loo, size, pr = _batch(sides, hollow)
        # Batches of different sizes weigh as in the engine's sums (one batch: no effect).
        w, w_loo = sketch.hsic_scale(hollow, m), sketch.hsic_scale(hollow, m - 1)
        terms.append([x * w for x in whole])
        loos.append([x * w_loo for x in loo])
        sizes.append([x * w for x in size])
        pr_a, pr_b = pr_a + pr[0], pr_b + pr[1]
        if permutations:  # sqrt(w) on each side: every inner product carries w
            for c, side in ((ca, sides[0]), (cb, sides[1])):
                for x in side.k:  # in place: the Grams are not needed as they were
                    centre(x, estimator)
                c.append(side.k.mul_(math.sqrt(w)))
        del sides
    matrix, se, method, loo, dead = _jackknife(terms, loos)
    m = max(len(r) for r in batches)
    if len(batches) == 1:
        se = _check_jackknife_rows(se, m, estimator)
    if len(batches) > 1 or m - 1 >= 3 + hollow:  # else the jackknife is void, warned above
        _warn_constant_without(dead, np.concatenate(batches), names or tuple(
            [f"mats_{s}[{i}]" for i in range(len(x))] for s, x in (("a", mats_a), ("b", mats_b))),
            method)
    pr_a, pr_b = (pr_a / len(batches)).cpu().numpy(), (pr_b / len(batches)).cpu().numpy()
    cal = Calibration(matrix, se, method, pr_a, pr_b,
                      np.sqrt(pr_a[:, None] * pr_b[None, :]) / (m - 1),
                      np.concatenate(batches), loo, _rounding(terms, sizes, matrix, m))
    if permutations:
        cal.null = permutation_null(ca, cb, cal.matrix, permutations, seed)
    return cal


def _checked(mats_a: Any, mats_b: Any, estimator: str, kernel: str, sigma2_a: Any, sigma2_b: Any):
    """``(mats_a, mats_b, n)``: lists of ``(n, p)`` matrices; ValueError for unusable ones."""
    check_options(kernel, estimator)
    out = []
    for side, mats, sig in (("a", mats_a, sigma2_a), ("b", mats_b, sigma2_b)):
        if len(getattr(mats, "shape", ())) == 2:
            raise ValueError(f"mats_{side} is a single (n, p) matrix; pass a list, e.g. [x]")
        out.append(feature_set(mats, f"mats_{side}", out[0][2] if out else None))
        if kernel == "rbf" and not _per_layer(sig, len(out[-1][1])):
            got = len(sig) if np.ndim(sig) == 1 and len(sig) != len(out[-1][1]) else sig
            raise ValueError(f"kernel='rbf' needs sigma2_a and sigma2_b, a squared bandwidth "
                             f"per layer (threshold^2 times repsim.cka.rbf_bandwidths), finite; "
                             f"got {got} for the {len(out[-1][1])} layers of mats_{side}")
    check_rows(out[0][2], estimator)
    return out[0][1], out[1][1], out[0][2]


def calibrate_result(res: CKAResult, mats_a: list[Any], mats_b: list[Any], *,
                     permutations: int = 0, seed: int = 0, influence: int = 0,
                     ids: np.ndarray | None = None, device: str | torch.device = "cpu",
                     memory_budget: int | None = None) -> CKAResult:
    """Add standard errors, participation ratios and (``permutations``) the null to ``res``,
    :func:`repsim.cka.compare`'s CKA of ``mats_a`` and ``mats_b`` (its settings and bandwidths
    reused). ``influence``: per cell, the ``influence`` images whose removal moves it most,
    as ``[sample id, change]`` (``ids``: the rows' sample IDs). ``memory_budget``: bytes."""
    if not is_whole(influence, 0):  # before the work, naming the caller's argument
        raise ValueError(f"influence={influence!r} must be a whole number >= 0 (images to list "
                         "per cell; 0: none)")
    mats_a, mats_b, n = _checked(mats_a, mats_b, res.estimator, "linear", None, None)
    k = n if ids is None else len(ids)  # one sample ID per row
    if (len(mats_a), len(mats_b), n, k) != (len(res.layers_a), len(res.layers_b), res.n, res.n):
        raise ValueError(f"mats_a and mats_b have {len(mats_a)} and {len(mats_b)} layers of {n} "
                         f"rows, ids {k}; res is of {len(res.layers_a)} and {len(res.layers_b)} "
                         f"layers of {res.n} rows: pass res's own features (and IDs)")
    batches = (minibatches(res.n, res.batch_size, res.batch_seed)
               if res.estimator == "minibatch" else None)
    sig = [None if b is None else [res.threshold**2 * v for v in b]
           for b in (res.bandwidths_a, res.bandwidths_b)]
    cal = calibrate(mats_a, mats_b, estimator=res.estimator, kernel=res.kernel,
                    sigma2_a=sig[0], sigma2_b=sig[1], batches=batches,
                    permutations=permutations, seed=seed, device=device,
                    memory_budget=memory_budget, names=(res.layers_a, res.layers_b))
    # The engine sums the same terms in another order: equal up to their rounding, but for
    # noise (RBF Grams near the identity): a bound of 1 or more, or none, or no engine value.
    tol = np.nan_to_num(1e-12 + 1e-9 * np.abs(res.matrix) + cal.rounding)
    if not (np.isclose(cal.matrix, res.matrix, rtol=0, atol=tol) | np.isnan(res.matrix)
            | ~(cal.rounding < 1)).all():
        raise ValueError("the CKA of mats_a and mats_b differs from res.matrix: pass res's "
                         "own features, same layers, same order (if you did, please report)")
    res.se, res.se_method, res.pr_a, res.pr_b = cal.se, cal.se_method, cal.pr_a, cal.pr_b
    res.biased_null_mean = cal.biased_null_mean
    if permutations:
        res.permutations, res.permutation_seed = permutations, seed
        res.p_value, res.null_mean, res.null_q95 = (cal.null[k] for k in
                                                    ("p_value", "null_mean", "null_q95"))
    if influence:
        ids = np.arange(res.n) if ids is None else np.asarray(ids)
        res.influence = [[[[int(ids[r]), d] for r, d in cal.influence(i, j, influence)]
                          for j in range(len(res.layers_b))] for i in range(len(res.layers_a))]
    return res
