"""The permutation null of CKA from centred Grams (:func:`permutation_null`), for
:func:`repsim.stats.calibrate`: re-pairing the images of B with those of A re-indexes A's
centred Grams, ``<P C_a P', C_b>``, so no Gram is made again."""

from __future__ import annotations

import numpy as np
import torch

from repsim.cka import F64

CHUNK = 512  # triangle entries per product in the permutation null


def permutation_null(ca: list[torch.Tensor], cb: list[torch.Tensor], observed: np.ndarray,
                     permutations: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Permutation null of CKA from centred Grams (:func:`repsim.cka.centre`), one
    ``(L, m, m)`` pair per batch; each permutation reorders one side's rows within every
    batch (A's, or B's if it has fewer layers); a self-comparison's cells (i, j) and (j, i)
    share one null.
    Per cell: ``p_value`` ``(1 + #{null >= observed}) / (1 + permutations)``, ``null_mean``,
    ``null_q95``."""
    if len(ca[0]) > len(cb[0]):  # re-index the side with fewer layers
        null = permutation_null(cb, ca, observed.T, permutations, seed)
        return {k: v.T for k, v in null.items()}
    own_a = sum((c.flatten(1) ** 2).sum(1) for c in ca)
    own_b = sum((c.flatten(1) ** 2).sum(1) for c in cb)
    den = torch.sqrt(own_a)[:, None] * torch.sqrt(own_b)[None, :]  # no product to overflow
    g = torch.Generator().manual_seed(seed)
    # Symmetric Grams: the upper triangle, off-diagonal terms twice, halves each permutation's
    # gather and product. A's Grams are entry-major (m^2, L_a), so the gather reads one short
    # row per entry; the triangle is cut into chunks of CHUNK entries for one batched product
    # (BLAS does one (L_a x N) @ (N x L_b) product, N ~ m^2 / 2, 3x slower than N / CHUNK
    # short ones). Padding entries point at entry 0 and meet zero rows of B.
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
    # A self-comparison (equal Grams on both sides, as `repsim cka --a M --b M` passes them):
    # cells (i, j) and (j, i) are one pair, so they share one null sample, the upper triangle's.
    if len(ca[0]) == len(cb[0]) and all(torch.equal(a, b) for a, b in zip(ca, cb)):
        null = np.triu(null) + np.triu(null, 1).swapaxes(1, 2)
    reached = null >= observed[None] - 1e-12  # a tie up to rounding reaches the observed
    # A NaN cell (a dead layer) reaches nothing: without this its p-value would be the least.
    p_value = np.where(np.isnan(observed), np.nan, (1 + reached.sum(0)) / (1 + permutations))
    return {"p_value": p_value,
            "null_mean": null.mean(0), "null_q95": np.quantile(null, 0.95, axis=0)}
