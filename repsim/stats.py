"""How much to trust a CKA value: standard errors, permutation nulls, effective dimensionality.

Everything here works on stacked Grams ``(L, m, m)`` of one batch of rows (all ``n`` rows for
the biased and debiased estimators, each random batch for minibatch CKA), in float64:

- **Delete-one jackknife over images, in closed form.** Removing image ``i`` changes the
  inner product, row sums and total of a Gram by rank-one terms, so every leave-one-out HSIC
  of every layer pair comes from three batched products, O(m^2) per pair like CKA itself
  (:func:`leave_one_out`). With minibatches the unit is a batch (delete-one-batch).
  The bootstrap over images is *not* offered: resampling with replacement duplicates
  images, which both Grams see as perfectly aligned pairs, so it inflates CKA (independent
  Gaussian data, n = 300, p = 3,000: debiased CKA -0.0002, on a bootstrap resample 0.91).
- **Permutation null.** Shuffling which image of B goes with which image of A re-indexes
  B's centred Gram (centring commutes with a permutation): ``<C_a, P C_b P'>``, never a
  new Gram (:func:`permutation_null`). Minibatch CKA permutes within each batch.
- **Participation ratio** ``PR = (tr HKH)^2 / ||HKH||_F^2`` of each layer (its effective
  dimensionality; at most ``m - 1``): the biased estimator's permutation-null mean is exactly
  ``sqrt(PR_a PR_b) / (m - 1)``, about 0.91 for isotropic features with ``p = 10 m``
  (Murphy, Zylberberg & Fyshe 2024). The unbiased estimators' null mean is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from repsim.cka import F64, centre, centring, gram, hsic_scale
from repsim.features import centred_rows
from repsim.sketch import CKAResult, minibatches, normalise

# minibatch CKA gets a delete-one-batch standard error from this many batches on
MIN_JACKKNIFE_BATCHES = 20


def grams(mats: list[Any], rows: np.ndarray | None = None, *, kernel: str = "linear",
          sigma2: list[float] | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Stacked Grams ``(L, m, m)`` float64 of the rows ``rows`` (default all) of each
    ``(n, p)`` matrix in ``mats``, features centred first (CKA does not change; the
    linear Gram is then already ``HKH``). RBF needs ``sigma2``, the squared bandwidth per
    layer (``threshold^2`` times :func:`repsim.cka.rbf_bandwidths`)."""
    return torch.stack([_gram(centred_rows(m, rows, torch.device(device)), kernel,
                              None if sigma2 is None else sigma2[i])
                        for i, m in enumerate(mats)])


def _gram(x: torch.Tensor, kernel: str, sigma2: float | None) -> torch.Tensor:
    if kernel == "rbf" and not sigma2 > 0:  # no bandwidth: the engine's dead layer (CKA NaN)
        return x.new_zeros(len(x), len(x))
    return gram(x, kernel=kernel, sigma2=sigma2)


def _parts(k: torch.Tensor, hollow: bool):
    """``(K, diag, row sums, total)`` of stacked Grams, with a zero diagonal if ``hollow``."""
    d = k.diagonal(dim1=1, dim2=2).clone()
    if hollow:
        k = k.clone()
        k.diagonal(dim1=1, dim2=2).zero_()
        d.zero_()
    r = k.sum(2)
    return k, d, r, r.sum(1)


def hsic(ka: torch.Tensor, kb: torch.Tensor, hollow: bool) -> torch.Tensor:
    """``<C(K_a), C(K_b)>`` ``(La, Lb)`` of stacked Grams: biased (``HKH``) or, with
    ``hollow``, U-centred (unbiased HSIC times ``m(m - 3)``)."""
    (ka, _, ra, sa), (kb, _, rb, sb) = _parts(ka, hollow), _parts(kb, hollow)
    a, b = centring(hollow, ka.shape[1])
    return ka.flatten(1) @ kb.flatten(1).T - 2 * a * (ra @ rb.T) + b * sa[:, None] * sb[None, :]


def leave_one_out(ka: torch.Tensor, kb: torch.Tensor, hollow: bool) -> torch.Tensor:
    """``<C(K_a), C(K_b)>`` on all rows but ``i``, for every ``i``: ``(m, La, Lb)``.

    With ``d`` the diagonal, ``r`` the row sums, ``s`` the total and ``u = r_a . r_b``,
    removing row ``i`` gives ``<K_a, K_b> - 2 (K_a o K_b 1)_i + d_ai d_bi``,
    ``s - 2 r_i + d_i`` and ``u - (K_a r_b)_i - (K_b r_a)_i + (K_a o K_b 1)_i
    - (r_ai - d_ai)(r_bi - d_bi)``; the centring constants are those of ``m - 1`` rows.
    """
    (ka, da, ra, sa), (kb, db, rb, sb) = _parts(ka, hollow), _parts(kb, hollow)
    m = ka.shape[1]
    a, b = centring(hollow, m - 1)
    rowdot = torch.einsum("aij,bij->iab", ka, kb)  # (K_a o K_b 1)_i
    dd = da.T[:, :, None] * db.T[:, None, :]
    dot = (ka.flatten(1) @ kb.flatten(1).T)[None] - 2 * rowdot + dd
    s_a, s_b = sa[None] - 2 * ra.T + da.T, sb[None] - 2 * rb.T + db.T  # (m, La), (m, Lb)
    u = ((ra @ rb.T)[None] - torch.einsum("aij,bj->iab", ka, rb)
         - torch.einsum("bij,aj->iab", kb, ra) + rowdot
         - (ra - da).T[:, :, None] * (rb - db).T[:, None, :])
    return dot - 2 * a * u + b * s_a[:, :, None] * s_b[:, None, :]


def _terms(f, ka: torch.Tensor, kb: torch.Tensor, hollow: bool) -> list[np.ndarray]:
    """``f`` (:func:`hsic` or :func:`leave_one_out`) of A with B, ``(..., La, Lb)``, and of
    each layer with itself only, ``(..., La)`` and ``(..., Lb)``."""
    own = [torch.stack([f(k[i:i + 1], k[i:i + 1], hollow)[..., 0, 0] for i in range(len(k))], -1)
           for k in (ka, kb)]
    return [x.cpu().numpy() for x in (f(ka, kb, hollow), *own)]


def jackknife_se(loo: np.ndarray) -> np.ndarray:
    """Delete-one jackknife standard error ``sqrt((g-1)/g sum (t_i - mean t)^2)`` over the
    first axis of ``loo`` ``(g, ...)`` (the estimates without unit ``i``)."""
    g = loo.shape[0]
    return ((g - 1) / g * ((loo - loo.mean(0)) ** 2).sum(0)) ** 0.5


def participation_ratio(k: torch.Tensor) -> torch.Tensor:
    """``(tr HKH)^2 / ||HKH||_F^2`` of stacked Grams ``(L, m, m)``: ``(L,)``."""
    c = torch.stack([centre(x.clone(), "biased") for x in k])
    tr = c.diagonal(dim1=1, dim2=2).sum(1)
    return tr**2 / (c * c).sum((1, 2))


CHUNK = 512  # triangle entries per product in the permutation null


def permutation_null(ca: list[torch.Tensor], cb: list[torch.Tensor], observed: np.ndarray,
                     permutations: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Permutation null of CKA from centred Grams, one ``(L, m, m)`` pair per batch
    (:func:`repsim.cka.centre` of each). Each permutation pairs B's rows with a random
    reordering of A's within every batch. Returns ``p_value`` ``(1 + #{null >= observed}) /
    (1 + permutations)``, ``null_mean`` and ``null_q95`` per cell."""
    if len(ca[0]) > len(cb[0]):  # re-index the side with fewer layers
        null = permutation_null(cb, ca, observed.T, permutations, seed)
        return {k: v.T for k, v in null.items()}
    own_a = sum((c.flatten(1) ** 2).sum(1) for c in ca)
    own_b = sum((c.flatten(1) ** 2).sum(1) for c in cb)
    den = torch.sqrt(own_a[:, None] * own_b[None, :])
    g = torch.Generator().manual_seed(seed)
    # Both Grams are symmetric: sum over the upper triangle, off-diagonal terms twice, which
    # halves the gather and the product that every permutation costs. A's Grams are stored
    # entry-major, (m^2, L_a), so the gather reads one short row per entry; the triangle is
    # cut into chunks of CHUNK entries for one batched product (BLAS does one (L_a x N) @
    # (N x L_b) product with N ~ m^2 / 2 about 3x slower than N / CHUNK short ones). The
    # padding entries point at entry 0 and meet zero rows of B.
    batches = []
    for a, b in zip(ca, cb):
        m = a.shape[1]
        r, c = torch.triu_indices(m, m, device=a.device)
        w = torch.where(r == c, 1.0, 2.0).to(F64)
        pad = -len(r) % CHUNK
        fb = torch.cat([(b[:, r, c] * w).T, b.new_zeros(pad, len(b))])
        r, c = (torch.cat([x, x.new_zeros(pad)]) for x in (r, c))
        batches.append((a.flatten(1).T.contiguous(), fb.view(-1, CHUNK, len(b)), r, c, m))
    null = torch.empty(permutations, *den.shape, dtype=F64)
    for t in range(permutations):
        num = 0.0
        for fa, fb, r, c, m in batches:
            p = torch.randperm(m, generator=g).to(fa.device)
            rows = torch.index_select(fa, 0, (p * m)[r] + p[c])  # (P C P')_rc of each layer
            num = num + torch.bmm(rows.view(len(fb), CHUNK, -1).transpose(1, 2), fb).sum(0)
        null[t] = (num / den).cpu()
    null = null.numpy()
    reached = null >= observed[None] - 1e-12  # a tie up to rounding reaches the observed
    # A NaN cell (a dead layer) reaches nothing: without this its p-value would be the least.
    p_value = np.where(np.isnan(observed), np.nan, (1 + reached.sum(0)) / (1 + permutations))
    return {"p_value": p_value,
            "null_mean": null.mean(0), "null_q95": np.quantile(null, 0.95, axis=0)}


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
    null: dict[str, np.ndarray] = field(default_factory=dict)  # p_value, null_mean, null_q95

    def influence(self, i: int, j: int, k: int) -> list[tuple[int, float]]:
        """The ``k`` rows whose removal moves cell ``(i, j)`` most: ``(row, change)``."""
        d = self.loo[:, i, j] - self.matrix[i, j]
        top = np.argsort(-np.abs(d), kind="stable")[:k]
        return [(int(self.rows[r]), float(d[r])) for r in top]


def calibrate(mats_a: list[Any], mats_b: list[Any], *, estimator: str = "debiased",
              kernel: str = "linear", sigma2_a: list[float] | None = None,
              sigma2_b: list[float] | None = None, batches: list[np.ndarray] | None = None,
              permutations: int = 0, seed: int = 0,
              device: str | torch.device = "cpu") -> Calibration:
    """CKA of every layer pair of ``mats_a``, ``mats_b`` (lists of ``(n, p)`` matrices, rows
    aligned) with its jackknife standard error, participation ratios and, with
    ``permutations``, the permutation null. ``batches``: the row sets of minibatch CKA
    (default: all rows, one batch). Removing an image changes only its batch's terms, so the
    delete-one-image jackknife is closed-form for every estimator. Needs one batch's Grams
    in memory: ``(La + Lb) m^2`` float64 numbers."""
    hollow = estimator != "biased"
    n = np.shape(mats_a[0])[0]
    batches = batches or [np.arange(n)]
    terms, loos, pr_a, pr_b, ca, cb = [], [], 0.0, 0.0, [], []
    for rows in batches:
        whole = len(rows) == n
        ka = grams(mats_a, None if whole else rows, kernel=kernel, sigma2=sigma2_a, device=device)
        kb = grams(mats_b, None if whole else rows, kernel=kernel, sigma2=sigma2_b, device=device)
        # Batches of different sizes weigh as in the engine's sums (one batch: no effect).
        w, w_loo = hsic_scale(hollow, len(rows)), hsic_scale(hollow, len(rows) - 1)
        terms.append([x * w for x in _terms(hsic, ka, kb, hollow)])
        loos.append([x * w_loo for x in _terms(leave_one_out, ka, kb, hollow)])
        pr_a, pr_b = pr_a + participation_ratio(ka), pr_b + participation_ratio(kb)
        if permutations:  # sqrt(w) on each side: every inner product carries w
            ca.append(torch.stack([centre(x, estimator) for x in ka]) * math.sqrt(w))
            cb.append(torch.stack([centre(x, estimator) for x in kb]) * math.sqrt(w))
        del ka, kb
    per_batch = [np.stack(x) for x in zip(*terms)]  # (B, La, Lb), (B, La), (B, Lb)
    total = [x.sum(0) for x in per_batch]
    # Without image i of batch b: the totals with batch b's terms replaced by its leave-one-out.
    loo = np.concatenate([normalise(*(t - x[b] + y for t, x, y in zip(total, per_batch, loo_b)))
                          for b, loo_b in enumerate(loos)])
    if len(batches) >= MIN_JACKKNIFE_BATCHES:
        method = "delete-one-batch"
        se = jackknife_se(normalise(*(t - x for t, x in zip(total, per_batch))))
    else:
        method, se = "delete-one-image", jackknife_se(loo)
    m = max(len(r) for r in batches)
    pr_a, pr_b = (pr_a / len(batches)).cpu().numpy(), (pr_b / len(batches)).cpu().numpy()
    cal = Calibration(normalise(*total), se, method, pr_a, pr_b,
                      np.sqrt(pr_a[:, None] * pr_b[None, :]) / (m - 1),
                      np.concatenate(batches), loo)
    if permutations:
        cal.null = permutation_null(ca, cb, cal.matrix, permutations, seed)
    return cal


def calibrate_result(res: CKAResult, mats_a: list[Any], mats_b: list[Any], *,
                     permutations: int = 0, seed: int = 0, influence: int = 0,
                     ids: np.ndarray | None = None,
                     device: str | torch.device = "cpu") -> CKAResult:
    """Add standard errors, participation ratios and (``permutations``) the null to ``res``,
    the CKA of ``mats_a`` and ``mats_b`` made by :func:`repsim.cka.compare` (its settings
    and bandwidths are reused). ``influence``: per cell, the ``influence`` images whose removal
    moves it most, as ``[sample id, change]`` (``ids``: the rows' sample IDs)."""
    batches = (minibatches(res.n, res.batch_size, res.batch_seed)
               if res.estimator == "minibatch" else None)
    sig = [None if b is None else [res.threshold**2 * v for v in b]
           for b in (res.bandwidths_a, res.bandwidths_b)]
    cal = calibrate(mats_a, mats_b, estimator=res.estimator, kernel=res.kernel,
                    sigma2_a=sig[0], sigma2_b=sig[1], batches=batches,
                    permutations=permutations, seed=seed, device=device)
    if not np.allclose(cal.matrix, res.matrix, rtol=1e-9, atol=1e-12, equal_nan=True):
        raise RuntimeError("the calibrated CKA matrix differs from the engine's; please report")
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
