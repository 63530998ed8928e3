"""Centred kernel alignment (CKA) between every layer of two networks: one engine.

CKA (Kornblith et al. 2019) of two layers of feature sets (:mod:`repsim.features`) with
``n x n`` Grams ``K``, ``L`` (linear ``X X'``, or RBF ``exp(-|x_i - x_j|^2 / 2s^2)``,
``s^2 = threshold^2 median|x_i - x_j|^2``) is ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``,
each HSIC an inner product of centred Grams ``<C(K), C(L)>``:

- ``biased`` (Gretton et al. 2005): ``C(K) = H K H``, ``H = I - 11'/n``;
- ``debiased`` (Song et al. 2012): U-centring zeroes the diagonal and sets
  ``C_ij = K_ij - (r_i + r_j)/(n-2) + s/((n-1)(n-2))``, with ``r`` the row sums of the
  zero-diagonal ``K`` and ``s = sum(r)``; ``<C(K), C(L)> / (n(n-3))`` is unbiased HSIC;
- ``minibatch`` (Nguyen, Raghu & Kornblith 2021): debiased HSIC summed over random batches
  of rows (:func:`minibatches`) before normalising, in O(batch^2) memory whatever ``n``.

Both centrings are ``C_ij = K_ij - a (r_i + r_j) + b s`` (:func:`repsim.sketch.centring`), so
``<C(K), C(L)> = <K, L> - 2a r_K.r_L + b s_K s_L``: the engine (:func:`_hsic`) sums ``<K, L>``,
``r`` and ``s`` over tiles of the Grams' upper triangles, all layers' tiles stacked so that all
``La x Lb`` inner products are one matrix product. Float64, within ``memory_budget`` bytes,
never clamped: a negative debiased value is an honest estimate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repsim import sketch
from repsim.errors import finite_real
from repsim.features import (
    default_memory_budget,
    feature_set,
    in_memory,
    pick_device,
    read_rows,
    take,
)
from repsim.sketch import ESTIMATORS, KERNELS, CKAResult, cka_from_sketches, minibatches  # noqa: F401

F64 = torch.float64
DEFAULT = sketch.DEFAULT_ESTIMATOR  # minibatch, batches of 1,024
CONTENT_VERSION = sketch.CONTENT_VERSION  # raised by fixes that change CKA numbers (see there)
SQRT2 = math.sqrt(2.0)
HSIC_KEYS = ("hsic_ab", "hsic_aa", "hsic_bb")  # MinibatchCKA.sums(): (La, Lb), (La,), (Lb,)


def gram(x: torch.Tensor, y: torch.Tensor | None = None, *, kernel: str = "linear",
         sigma2: float | None = None, out: torch.Tensor | None = None,
         norms: tuple[torch.Tensor, torch.Tensor] | None = None,
         minus_one: bool = False) -> torch.Tensor:
    """Kernel matrix ``(m, w)`` of the rows of ``x`` ``(m, p)`` and ``y`` ``(w, p)`` (default
    ``x``): ``x y'``, or ``exp(-|x_i - y_j|^2 / (2 sigma2))`` for RBF (``norms``: the rows'
    squared norms, if known). ``minus_one``: the RBF Gram less 1 (``expm1``), the same once
    centred; entries near 1 (a wide bandwidth) would lose their digits in ``exp`` and centring."""
    if kernel == "linear":
        return _dot(x, y, out)
    sketch.check_options(kernel, "biased")  # an unknown kernel
    if sigma2 is None or not sigma2 > 0:
        raise ValueError(f"kernel='rbf' needs sigma2 > 0, the squared bandwidth (threshold^2 "
                         f"times a median from rbf_bandwidths), got sigma2={sigma2!r}")
    k = _sqdist(x, y, out, norms).mul_(-0.5 / sigma2)
    return k.expm1_() if minus_one else k.exp_()


GRAM_BLOCK = 256  # rows per strip of a symmetric Gram


def _dot(x: torch.Tensor, y: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """``x y'``; for ``y`` None, ``x x'`` from strips of its upper triangle, mirrored (5/8 of
    the products at m = 1,000; 1.3-1.9x faster than one product on our CPU, float64)."""
    if y is not None or len(x) <= GRAM_BLOCK:
        return torch.matmul(x, x.T if y is None else y.T, out=out)
    out = x.new_empty(len(x), len(x)) if out is None else out
    for r0 in range(0, len(x), GRAM_BLOCK):
        r1, blk = r0 + GRAM_BLOCK, x[r0:r0 + GRAM_BLOCK] @ x[r0:].T
        out[r0:r1, r0:], out[r1:, r0:r1] = blk, blk[:, GRAM_BLOCK:].T
    return out


def _sqdist(x: torch.Tensor, y: torch.Tensor | None, out: torch.Tensor | None = None,
            norms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2 a.b, as in Kornblith et al.'s code (no clamping).
    nx, ny = norms or ((x * x).sum(1), (x * x).sum(1) if y is None else (y * y).sum(1))
    return _dot(x, y, out).mul_(-2.0).add_(nx[:, None]).add_(ny[None, :])


def centre(k: torch.Tensor, estimator: str) -> torch.Tensor:
    """``H K H`` (``"biased"``) or the U-centred ``K`` (otherwise) of a symmetric Gram, in place."""
    sketch.check_options("linear", estimator)  # an unknown estimator
    hollow = estimator != "biased"
    if hollow:
        k.fill_diagonal_(0.0)
    a, b = sketch.centring(hollow, k.shape[0])
    r = k.sum(1)
    k.sub_(a * r[:, None]).sub_(a * r[None, :]).add_(b * r.sum())
    return k.fill_diagonal_(0.0) if hollow else k


@dataclass
class _Layer:
    """One layer of one batch, checked, with its column means."""

    name: str
    src: Any  # (m, p) source
    mean: torch.Tensor  # (p,) float64
    x: torch.Tensor | None  # (m, p) centred float64 rows when resident, else read per block
    sigma2: float | None = None  # RBF: the squared bandwidth
    sq: torch.Tensor | None = None  # RBF: (m,) squared norms of the centred rows
    dead: str | None = None  # why it adds nothing to this batch (its CKA is NaN)

    def rows(self, a: int, b: int, device: torch.device) -> torch.Tensor:
        return self.x[a:b] if self.x is not None else read_rows(self.src, a, b, device) - self.mean


def _load(name: str, src: Any, device: torch.device, resident: bool,
          rows: np.ndarray | None = None, sigma2: float | None = None) -> _Layer:
    """One pass over a layer's row blocks: refuse non-finite values (``rows``: row numbers for
    the message), find constancy and column means; keep it centred if resident."""
    n = src.shape[0]
    colsum, first, constant = 0.0, None, True
    blocks = sketch.block_bounds(n, n if resident else 4096)
    for a, b in blocks:
        x = read_rows(src, a, b, device)
        colsum = colsum + x.sum(0)
        # NaN and infinity make a column sum non-finite: one reduction checks every value.
        if not bool(torch.isfinite(colsum).all()):
            bad = (~torch.isfinite(x).all(1)).nonzero()[:1, 0].tolist()
            numbers = range(a, b) if rows is None else rows[a:b]
            where = f"first at row {numbers[bad[0]]}" if bad else "its column sums overflow"
            raise ValueError(f"layer {name!r} has non-finite values ({where}); check the "
                             "activations (overflow in float16 storage?) before computing CKA")
        first = x[:1] if first is None else first
        constant = constant and bool((x == first).all())
    layer = _Layer(name, src, colsum / n, x.sub_(colsum / n) if resident else None, sigma2)
    if constant:
        layer.dead = sketch.ZERO_VARIANCE
    elif sigma2 is not None and not sigma2 > 0:
        layer.dead = sketch.ZERO_BANDWIDTH
    elif sigma2 is not None:  # every RBF tile needs them
        layer.sq = torch.cat([(layer.rows(a, b, device) ** 2).sum(1) for a, b in blocks])
        sketch.check_spread(name, float(layer.sq.max()))
    return layer


# ------------------------------------------------------------ the engine and its accumulator


def _hsic(la: list[_Layer], lb: list[_Layer] | None, kernel: str, estimator: str,
          device: torch.device, budget: int, progress: bool = False):
    """``<C(K_a), C(K_b)>`` of every layer pair of one batch ``(La, Lb)``, and of every
    layer with itself ``(La,)``, ``(Lb,)``; float64, 0 for dead layers. ``lb=None``: B is A.
    Also each side's Gram totals ``[(La,), (Lb,)]`` as built (RBF: less 1, see :func:`gram`)."""
    n = la[0].src.shape[0]
    sides = [la] if lb is None else [la, lb]
    layers = [L for side in sides for L in side]
    # Memory: a row and a column block of centred features take a quarter of the budget each
    # (all rows when every layer is resident), the stacked Gram strips another quarter.
    block = n
    if any(L.x is None for L in layers):
        block = max(8, budget // 4 // (8 * max(L.src.shape[1] for L in layers) * len(layers)))
        block = math.ceil(n / math.ceil(n / block))  # equal blocks
    # Strips: small for cache-friendly products, many so the skipped lower triangle counts.
    cap = 256 if device.type == "cpu" else 1024
    strip = max(16, min(budget // 4 // (8 * len(layers) * block), cap, n))
    bufs = [torch.empty(len(side) * strip * block, dtype=F64, device=device) for side in sides]
    r = [torch.zeros(len(side), n, dtype=F64, device=device) for side in sides]  # K 1
    sq = [torch.zeros(len(side), dtype=F64, device=device) for side in sides]  # <K, K>
    dot = torch.zeros(len(la), len(sides[-1]), dtype=F64, device=device)  # <K_a, K_b>
    bounds = sketch.block_bounds(n, block)
    tiles = [(rb, cb, sb) for k, rb in enumerate(bounds) for cb in bounds[k:]
             for sb in sketch.block_bounds(rb[1] - rb[0], strip)]
    if progress:
        from tqdm.auto import tqdm
        tiles = tqdm(tiles, desc="CKA", unit="tile", leave=False)
    for (r0, r1), (c0, c1), (s0, s1) in tiles:
        on_diag = c0 == r0
        if s0 == 0:  # a new pair of blocks: read each once (old ones freed first)
            xc = None
            if on_diag:
                xr = None
                xr = [[L.rows(r0, r1, device) for L in side] for side in sides]
            xc = xr if on_diag else [[L.rows(c0, c1, device) for L in side] for side in sides]
        lo = s0 if on_diag else 0  # on a diagonal block: the trapezoid from the strip's diagonal
        g = [_tile(side, [x[s0:s1] for x in xr[k]], [x[lo:] for x in xc[k]], r0 + s0,
                   c0 + lo, s1 - s0 if on_diag else 0, kernel, estimator != "biased", r[k],
                   bufs[k]).flatten(1) for k, side in enumerate(sides)]
        dot += g[0] @ g[-1].T
        for k, f in enumerate(g):
            sq[k] += (f * f).sum(1)
    a, b = sketch.centring(estimator != "biased", n)
    s = [x.sum(1) for x in r]
    own = [sq[k] - 2 * a * (r[k] * r[k]).sum(1) + b * s[k] ** 2 for k in range(len(sides))]
    cross = dot - 2 * a * (r[0] @ r[-1].T) + b * s[0][:, None] * s[-1][None, :]
    if lb is None:  # self terms as summed for the cross terms: a layer with itself gives 1
        own = [cross.diagonal().clone()]
    return cross, own[0], own[-1], [s[0], s[-1]]


def _tile(side: list[_Layer], xr: list, xc: list, r0: int, c0: int, diag: int, kernel: str,
          hollow: bool, r: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Stacked Grams ``K[r0:, c0:]`` ``(L, s, w)`` of one side's layers (rows ``xr``, columns
    ``xc``); adds their row sums to ``r`` ``(L, n)``. The first ``diag`` columns are on the
    Gram's diagonal; the others also stand for their mirror image, so they carry sqrt(2)."""
    s, w = xr[0].shape[0], xc[0].shape[0]
    out = buf[:len(side) * s * w].view(len(side), s, w)
    for i, L in enumerate(side):
        if L.dead:
            out[i].zero_()
            continue
        norms = None if L.sq is None else (L.sq[r0:r0 + s], L.sq[c0:c0 + w])
        g = gram(xr[i], xc[i], kernel=kernel, sigma2=L.sigma2, out=out[i], norms=norms,
                 minus_one=True)
        if hollow:
            g[:, :diag].diagonal().zero_()
        # The tile's row sums, and its mirror image's; even linear ones: rows centred with a
        # rounded mean keep a residual offset, so K 1 is not exactly 0 (1e10 + N(0, 1): 1e-8).
        r[i, r0:r0 + s] += g.sum(1)
        r[i, c0 + diag:c0 + w] += g[:, diag:].sum(0)
    out[:, :, diag:] *= SQRT2
    return out


class MinibatchCKA:
    """Sums HSIC over batches (``update(batch_a, batch_b)``: feature sets of the same ``m``
    samples): unbiased HSIC (``debiased``, the minibatch estimator) or ``tr(K H L H) / m^2``;
    :meth:`compute` gives the ``(La, Lb)`` CKA matrix. Sums of several processes add up
    exactly (:meth:`merge`, or ``all_reduce`` on :meth:`sums`). ``dead_``: per side and layer,
    why it added nothing to any batch, or None; ``layers_``: per side (one when B is A), the
    layers' names. RBF needs ``median_sqdist_a``/``_b``."""

    def __init__(self, *, kernel: str = "linear", debiased: bool = True, threshold: float = 1.0,
                 median_sqdist_a: Sequence[float] | None = None,
                 median_sqdist_b: Sequence[float] | None = None,
                 device: str | torch.device | None = None,
                 memory_budget: int | None = None) -> None:
        sketch.check_options(kernel, sketch.estimator_of(debiased), threshold, None)
        if kernel == "rbf":
            sketch.check_medians(median_sqdist_a, median_sqdist_b)
        self.kernel, self.debiased, self.threshold = kernel, bool(debiased), threshold
        self.memory_budget = memory_budget
        # Python floats: merge() compares settings as text, where np.float64(2.0) is not 2.0.
        self.sigma2 = [None if m is None or kernel == "linear" else
                       [threshold**2 * float(v) for v in m]
                       for m in (median_sqdist_a, median_sqdist_b)]
        self.device = None if device is None else torch.device(device)
        # All state that compute() reads is in these tensors, so that an in-place all_reduce
        # of sums() merges all of it (the warnings too); see _batch_sums for the keys.
        self._sums: dict[str, torch.Tensor] = {}
        self.hsic_ab_ = self.hsic_aa_ = self.hsic_bb_ = None  # HSIC sums: (La, Lb), (La,), (Lb,)
        self._why: list[list[str | None]] = [[], []]  # per side and layer: why it was dead
        self.layers_: list[list[str]] = []

    n_batches_ = property(lambda self: int(self._sums.get("n_batches", 0)), doc="batches added")
    n_samples_ = property(lambda self: int(self._sums.get("n_samples", 0)), doc="rows added")

    @property
    def dead_(self) -> list[list[str | None]]:
        """Per side and layer: why it added nothing to any batch (of any process, once their
        sums are reduced), or None."""
        return [[why if n == 0 else None for why, n in zip(whys, self._sums[k].tolist())]
                for whys, k in zip(self._why, ("live_a", "live_b"))] if self._sums else [[], []]

    def update(self, batch_a: Any, batch_b: Any) -> MinibatchCKA:
        """Add one batch. A batch too small for the estimator is skipped with a warning."""
        return self._add(batch_a, batch_b)

    def _add(self, batch_a: Any, batch_b: Any, rows: np.ndarray | None = None,
             progress: bool = False) -> MinibatchCKA:
        names_a, mats_a, m = feature_set(batch_a, "a")
        same = batch_b is batch_a
        names_b, mats_b, _ = (names_a, mats_a, m) if same else feature_set(batch_b, "b", m)
        if m < (need := 4 if self.debiased else 2):
            warnings.warn(f"dropping a batch of {m} rows: the estimator needs at least {need}",
                          RuntimeWarning, stacklevel=3)
            return self
        dev = self.device or pick_device(mats_a + mats_b, None)
        budget = default_memory_budget(dev, self.memory_budget)
        todo = [(names_a, mats_a, self.sigma2[0]), (names_b, mats_b, self.sigma2[1])][:2 - same]
        # Centred float64 features stay in memory when they fit in half the budget.
        resident = 8 * m * sum(x.shape[1] for _, mats, _ in todo for x in mats) <= budget // 2
        sides = []
        for names, mats, sig in todo:
            if sig is not None and len(sig) != len(mats):
                raise ValueError(f"got {len(sig)} bandwidths for {len(mats)} layers")
            sides.append([_load(nm, x, dev, resident, rows, None if sig is None else sig[k])
                          for k, (nm, x) in enumerate(zip(names, mats))])
        *hsic, totals = _hsic(sides[0], None if same else sides[1], self.kernel,
                              "debiased" if self.debiased else "biased", dev, budget, progress)
        why = [[L.dead for L in side] for side in (sides[0], sides[-1])]
        names = [names_a] if same else [names_a, names_b]
        return self._accumulate(self._batch_sums(hsic, why, m, totals), why, names)

    def _batch_sums(self, hsic: list[torch.Tensor], why: list[list[str | None]], m: int,
                    totals: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One batch's share of :meth:`sums`: ``live_a``/``_b`` count the batches each layer
        added to; RBF ``offdiag_a``/``_b``: the Grams' summed off-diagonal entries (the
        engine's totals were of ``K - 1`` with diagonal 0), for the identity warning."""
        scale, dev = sketch.hsic_scale(self.debiased, m), hsic[0].device
        out = dict(zip(HSIC_KEYS, (x * scale for x in hsic)))
        for k, v in (("n_batches", 1), ("n_samples", m)):
            out[k] = torch.tensor(float(v), dtype=F64, device=dev)
        for k, dead in zip(("live_a", "live_b"), why):
            out[k] = torch.tensor([float(not d) for d in dead], dtype=F64, device=dev)
        if self.kernel == "rbf":
            out["offdiag_a"], out["offdiag_b"] = (t.to(dev, F64) + m * (m - 1) for t in totals)
        return out

    def _accumulate(self, add: dict[str, torch.Tensor], why: list[list[str | None]],
                    names: list[list[str]]) -> MinibatchCKA:
        if not self._sums:  # own copies: with A == B, aa and bb are one tensor
            self._sums = {k: x.clone() for k, x in add.items()}
            self.hsic_ab_, self.hsic_aa_, self.hsic_bb_ = (self._sums[k] for k in HSIC_KEYS)
            self._why, self.layers_ = [list(d) for d in why], [list(x) for x in names]
            return self
        # Order matters; the same names on each side also mean sums of the same shapes.
        if names[0] != self.layers_[0] or names[-1] != self.layers_[-1]:
            raise ValueError(f"batch has layers {names}, earlier batches had {self.layers_}; "
                             "give every batch the same layers in the same order")
        for k, total in self._sums.items():
            total += add[k].to(total.device)
        self._why = [[old or new for old, new in zip(olds, news)]
                     for olds, news in zip(self._why, why)]
        return self

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add another accumulator's sums into this one (same layers and settings)."""
        mine, theirs = (f"kernel={x.kernel!r}, debiased={x.debiased}, squared bandwidths "
                        f"{x.sigma2}" for x in (self, other))
        if mine != theirs:  # their sums are of another HSIC: adding them would mean nothing
            raise ValueError(f"cannot merge: this accumulator has {mine}, the other {theirs}; "
                             "make both with the same settings")
        if not other._sums:
            return self
        return self._accumulate(other._sums, other._why, other.layers_)

    def sums(self) -> dict[str, torch.Tensor]:
        """The accumulator's state, float64 tensors (HSIC sums ``hsic_ab``/``_aa``/``_bb``,
        counts, and what the warnings need), not copies: an in-place ``all_reduce`` of each
        across processes is exact merging, and :meth:`compute` then reads the merged state."""
        if not self._sums:
            raise ValueError("no batch has been added yet")
        return dict(self._sums)

    def compute(self) -> np.ndarray:
        """CKA matrix ``(La, Lb)``; NaN where a layer's summed self-HSIC is not positive.
        Warns of dead layers, RBF Grams nearly the identity, and self-HSICs that underflow."""
        sums, dead = self.sums(), self.dead_  # raises before the first batch
        ab, aa, bb = (sums[k].cpu().numpy() for k in HSIC_KEYS)
        every = " in every batch" if self.n_batches_ > 1 else ""
        for names, whys in zip(self.layers_, dead):  # one side when B is A
            for name, why in ((nm, why) for nm, why in zip(names, whys) if why):
                warnings.warn(f"layer {name!r} {why}{every}; its CKA values are NaN",
                              RuntimeWarning, stacklevel=2)
        if self.kernel == "rbf":
            per_row = [sums[k].cpu().numpy() / self.n_samples_ for k in ("offdiag_a", "offdiag_b")]
            sketch.warn_identity_layers(self.threshold, self.layers_, per_row, dead, 3)
        else:  # RBF Grams do not depend on the features' scale; linear ones go as its square
            sketch.warn_underflow([aa, bb], [[not d for d in x] for x in dead])
        return sketch.normalise(ab, aa, bb)


# --------------------------------------------------------------------------- public API


def compare(feats_a: Any, feats_b: Any, *, kernel: str = "linear", estimator: str = DEFAULT,
            threshold: float = 1.0, batch_size: int | None = None, batch_seed: int = 0,
            device: str | torch.device | None = None, memory_budget: int | None = None,
            progress: bool = False) -> CKAResult:
    """CKA of every layer of ``feats_a`` with every layer of ``feats_b`` (feature sets of
    ``(n, p_l)`` matrices, the same ``n``): a :class:`CKAResult`, ``matrix`` ``(La, Lb)``;
    the same object twice: the exactly symmetric self-similarity, in half the work. Minibatch:
    random batches of ``batch_size`` rows (default 1,024; n <= 1,024: one batch, debiased)."""
    batch_size = sketch.check_options(kernel, estimator, threshold, batch_size)
    names_a, mats_a, n = feature_set(feats_a, "a")
    same = feats_b is feats_a
    names_b, mats_b, _ = (names_a, mats_a, n) if same else feature_set(feats_b, "b", n)
    same = same or list(map(id, mats_a)) == list(map(id, mats_b))  # linear_cka(x, x) too
    sketch.check_rows(n, estimator)
    dev = pick_device(mats_a + mats_b, device)
    budget = default_memory_budget(dev, memory_budget)
    mini = estimator == "minibatch"
    res = sketch.new_result(names_a, names_b, kernel, estimator, n, threshold, batch_size,
                            batch_seed)
    batches = sketch.batches(n, estimator, batch_size, batch_seed)
    if mini:
        both = in_memory(mats_a if same else mats_a + mats_b, budget // 2)
        mats_a, mats_b = both[:len(mats_a)], both if same else both[len(mats_a):]
    if kernel == "rbf":
        rows = sketch.bandwidth_rows(n, estimator)
        res.bandwidths_a = rbf_bandwidths(dict(zip(names_a, mats_a)), rows, dev)  # names: errors
        res.bandwidths_b = res.bandwidths_a if same else rbf_bandwidths(
            dict(zip(names_b, mats_b)), rows, dev)
    acc = MinibatchCKA(kernel=kernel, debiased=estimator != "biased", threshold=threshold,
                       median_sqdist_a=res.bandwidths_a, median_sqdist_b=res.bandwidths_b,
                       device=dev, memory_budget=budget)
    if progress and mini:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="minibatch CKA", unit="batch")
    for idx in batches:
        ba = dict(zip(names_a, [take(m, idx) for m in mats_a]))
        bb = ba if same else dict(zip(names_b, [take(m, idx) for m in mats_b]))
        acc._add(ba, bb, idx, progress and not mini)
    m = acc.compute()
    res.matrix = (m + m.T) / 2 if same else m  # exact symmetry despite summation order
    return res


def cka_matrix(feats_a: Any, feats_b: Any, *, kernel: str = "linear", estimator: str = DEFAULT,
               threshold: float = 1.0, batch_size: int | None = None,
               batch_seed: int = 0) -> np.ndarray:
    """CKA for all layer pairs: float64 ``(len(feats_a), len(feats_b))``; see :func:`compare`."""
    return compare(feats_a, feats_b, kernel=kernel, estimator=estimator, threshold=threshold,
                   batch_size=batch_size, batch_seed=batch_seed).matrix


def linear_cka(x: Any, y: Any, *, debiased: bool = True) -> float:
    """Linear CKA of two ``(n, p)`` / ``(n, q)`` matrices with the same rows (unbiased HSIC)."""
    return float(cka_matrix([x], [y], estimator=sketch.estimator_of(debiased))[0, 0])


def rbf_cka(x: Any, y: Any, *, threshold: float = 1.0, debiased: bool = True) -> float:
    """RBF-kernel CKA; bandwidth ``threshold * sqrt(median squared distance)`` per matrix."""
    return float(cka_matrix([x], [y], kernel="rbf", threshold=threshold,
                            estimator=sketch.estimator_of(debiased))[0, 0])


def rbf_bandwidths(feats: Any, rows: np.ndarray | None = None,
                   device: str | torch.device | None = None) -> list[float]:
    """Median squared distance per layer over ``rows`` (increasing indices; default all),
    diagonal included; ValueError if they over- or underflow float64 (:func:`sketch.check_spread`)
    or a value is not finite. Needs one ``len(rows)^2`` float64 matrix at a time."""
    names, mats, _ = feature_set(feats, "a")
    dev, out = pick_device(mats, device), []
    for name, m in zip(names, mats):
        L = _load(name, take(m, rows), dev, True, rows)  # centred; non-finite: ValueError
        sq = (L.x * L.x).sum(1)
        out.append(_median(_sqdist(L.x, L.x, norms=(sq, sq)).flatten()))
        if not L.dead:  # a constant layer's median is 0 (or rounding): its NaN is explained
            sketch.check_spread(name, float(sq.max()), out[-1])
    return out


def _median(v: torch.Tensor) -> float:
    """numpy.median of a 1-D tensor (the mean of the two middle values for even counts)."""
    k = v.numel() // 2
    if v.device.type == "cpu":  # numpy.median itself: 25 % slower (a copy, a NaN check)
        part = np.partition(v.numpy(), [k - 1, k])
        return float(part[k] if v.numel() % 2 else (part[k - 1] + part[k]) / 2)
    hi = torch.kthvalue(v, k + 1).values
    return float(hi if v.numel() % 2 else (torch.kthvalue(v, k).values + hi) / 2)


def layer_sketch(x: Any, *, kernel: str = "linear", estimator: str = DEFAULT,
                 threshold: float = 1.0, batch_size: int | None = None, batch_seed: int = 0,
                 median_sqdist: float | None = None,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """One layer's ``(D,)`` float64 sketch (:func:`repsim.sketch.sketch_size`) of ``x``
    ``(n, p)``: each batch's centred Gram, upper triangle, off-diagonal entries times sqrt(2),
    scaled so that sketch inner products are :func:`compare`'s sums (:func:`cka_from_sketches`).
    RBF needs compare's ``median_sqdist`` (:func:`rbf_bandwidths`: all rows, or the fixed
    sample for minibatch). Non-finite input raises ValueError; a constant batch adds zeros."""
    batch_size = sketch.check_options(kernel, estimator, threshold, batch_size)
    # Not >= 0: rbf_bandwidths' median of duplicate rows can round below 0 (a dead layer).
    if kernel == "rbf" and not finite_real(median_sqdist):
        raise ValueError(f"median_sqdist={median_sqdist!r} is no median squared distance; "
                         "kernel='rbf' needs one number for this layer, e.g. "
                         "rbf_bandwidths([x])[0]")
    _, (x,), n = feature_set({"x": x}, "x")  # a 2-D (n, p) matrix, as compare checks
    dev, biased = pick_device([x], device), estimator == "biased"
    sketch.check_rows(n, estimator)
    if estimator == "minibatch":
        x = in_memory([x], default_memory_budget(dev) // 2)[0]
    sigma2 = threshold**2 * median_sqdist if kernel == "rbf" else None
    parts, mass, rows = [], 0.0, 0
    for idx in sketch.batches(n, estimator, batch_size, batch_seed):
        L = _load("x", take(x, idx), dev, True, idx, sigma2)
        m = L.x.shape[0]
        c = L.x.new_zeros(m, m) if L.dead else gram(L.x, kernel=kernel, sigma2=sigma2,
                                                     minus_one=True)
        if kernel == "rbf" and not L.dead:  # off-diagonal mass: K - 1 has a zero diagonal
            mass, rows = mass + float(c.sum()) + m * (m - 1), rows + m
        c = centre(c, estimator)
        diag = c.diagonal().clone()
        c.mul_(SQRT2).diagonal().copy_(diag)
        c = c[torch.ones(m, m, dtype=torch.bool, device=dev).triu_(0 if biased else 1)]
        parts.append(c / n if biased else c / math.sqrt(m * (m - 3)))
    if rows and mass / rows < sketch.IDENTITY_MASS:
        sketch.warn_identity(threshold, f"this layer ({mass / rows:.1e})", 3)
    return torch.cat(parts)
