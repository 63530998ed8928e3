"""Independent float64 CKA reference, written straight from the papers' formulas.

Deliberately naive: dense n x n numpy Grams, the centring matrix H, and Song et
al.'s unbiased HSIC formula term by term. It shares no code with repsim.cka.
"""

import numpy as np


def gram_linear(x):
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def gram_rbf(x, threshold=1.0, sq_median=None):
    """The bandwidth from the median squared distance of ``x``'s rows unless given."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)  # explicit pairwise distances
    return np.exp(-sq / (2 * threshold**2 * (np.median(sq) if sq_median is None else sq_median)))


def hsic_biased(k, l):
    """tr(K H L H) / (n-1)^2 (Gretton et al. 2005)."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k, l):
    """Song et al. 2012, eq. (5): unbiased HSIC from zero-diagonal Grams."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def cka_from_grams(k, l, debiased=False):
    h = hsic_unbiased if debiased else hsic_biased
    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def cka(x, y, kernel="linear", debiased=False, threshold=1.0):
    if kernel == "linear":
        return cka_from_grams(gram_linear(x), gram_linear(y), debiased)
    return cka_from_grams(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)


def minibatch_cka(x, y, batches, kernel="linear", threshold=1.0, sq_median_x=None,
                  sq_median_y=None):
    """Nguyen et al. 2021: sum unbiased HSIC over the given batches (lists of row
    indices), then normalise."""
    x, y = np.asarray(x), np.asarray(y)
    kl = kk = ll = 0.0
    for rows in batches:
        if kernel == "linear":
            k, l = gram_linear(x[rows]), gram_linear(y[rows])
        else:
            k = gram_rbf(x[rows], threshold, sq_median_x)
            l = gram_rbf(y[rows], threshold, sq_median_y)
        kl += hsic_unbiased(k, l)
        kk += hsic_unbiased(k, k)
        ll += hsic_unbiased(l, l)
    return kl / np.sqrt(kk * ll)
