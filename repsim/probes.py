"""Per-layer linear probes, and what deleting a layer's top principal components does to CKA
and to probe accuracy (Ding, Denain & Steinhardt 2021): :func:`linear_probe`,
:func:`remove_top_pcs`, both for every layer of a feature set (:func:`probe_layers`) or of a
model (:func:`probe_model`).

**The probe shares linear CKA's invariances.** Features are centred and divided by one number,
not z-scored per feature (that would change a layer's geometry, so a rotated copy of a layer
would probe differently while CKA calls the two identical). The L2-penalised fit starts at
zero and runs full-batch L-BFGS, whose iterates see the data only through inner products: an
isometry, a translation or a global scale of the features leaves the accuracy unchanged
(tested); a non-orthogonal linear map can change it. The loss is strictly convex, so there is
no randomness to seed: the ``seed`` of :func:`probe_layers` draws the train/test split.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from repsim.errors import UserError, is_whole

DEFAULT_KS = (1, 5, 10)
DEFAULT_WEIGHT_DECAY = 1e-3
DEFAULT_STEPS = 500
TOLERANCE = 1e-6  # L-BFGS stops when no gradient entry exceeds this


@contextmanager
def _one_thread(device: torch.device | None = None) -> Iterator[None]:
    """One CPU thread for the small matrices of probes and deletions (500 x 512): on a shared
    2-core machine a probe step took 116 ms on two threads, 13 ms on one."""
    before = torch.get_num_threads()
    if device is None or device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_finite(t: torch.Tensor, name: str) -> None:
    # A NaN or infinite row makes every logit NaN, and argmax then names class 0 for every test
    # row: an accuracy (the share of class 0) with no warning, so refuse, as CKA does.
    ok = torch.isfinite(t).flatten(1).all(1) if t.dim() > 1 else torch.isfinite(t)
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        raise UserError(f"{name} has non-finite values (first at row {row}); check the "
                        "activations (overflow in float16 storage?) before probing")


def _array(x: Any) -> np.ndarray:
    """``x`` as a numpy array: a torch tensor from any device, bfloat16 as float32 (numpy has
    no bfloat16, and np.asarray refused it)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _matrix(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2:
        raise UserError(f"{name} has shape {tuple(t.shape)}; pass an (n, p) matrix, one row "
                        "per sample")
    _check_finite(t, name)
    return t.to(device, torch.float64)


def standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Both splits centred on the training mean and divided by the root-mean-square distance
    of a training row to it (one scale, not one per feature: see the module docstring)."""
    mean = train_x.mean(0)
    scale = (train_x - mean).pow(2).sum(1).mean().sqrt()
    scale = scale if scale > 0 else torch.ones_like(scale)  # a constant layer stays zero
    return (train_x - mean) / scale, (test_x - mean) / scale


def linear_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, *,
                 weight_decay: float = DEFAULT_WEIGHT_DECAY, steps: int = DEFAULT_STEPS,
                 device: str | torch.device | None = None) -> float:
    """Test accuracy (a fraction in [0, 1]) of a multinomial logistic regression.

    ``train_x`` ``(n_train, p)``, ``test_x`` ``(n_test, p)``, integer labels ``(n_*,)``.
    Minimises mean cross-entropy ``+ weight_decay / 2 * ||W||^2`` on :func:`standardise`-d
    features, full-batch L-BFGS from zero for at most ``steps`` iterations, in float64 on
    ``device`` (default: a GPU when there is one). Deterministic.
    """
    from repsim.models import resolve_device

    if not is_whole(steps):  # 2.5 and True ran as L-BFGS's max_iter
        raise UserError(f"steps={steps!r} must be a whole number of L-BFGS iterations, at "
                        "least 1, e.g. 500")
    if not 0 <= weight_decay < math.inf:  # NaN fails too: it gives NaN logits
        raise UserError(f"weight_decay={weight_decay}, steps={steps}: pass a finite "
                        "weight_decay >= 0 and steps >= 1")
    dev = resolve_device(None if device is None else str(device))
    xtr, xte = _matrix(train_x, "train_x", dev), _matrix(test_x, "test_x", dev)
    labels = np.concatenate([_array(train_y).ravel(), _array(test_y).ravel()])
    if xtr.shape[1] != xte.shape[1] or len(labels) != len(xtr) + len(xte):
        raise UserError(f"train_x {tuple(xtr.shape)}, test_x {tuple(xte.shape)} and "
                        f"{len(labels)} labels do not fit; pass one label per row and the "
                        "same features in both splits")
    classes, codes = np.unique(labels, return_inverse=True)
    codes = torch.as_tensor(codes, device=dev)
    ytr, yte = codes[:len(xtr)], codes[len(xtr):]
    xtr, xte = standardise(xtr, xte)
    w = torch.zeros(xtr.shape[1], len(classes), dtype=torch.float64, device=dev,
                    requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20,
                            tolerance_grad=TOLERANCE, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(xtr @ w + b, ytr) + 0.5 * weight_decay * w.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad(), _one_thread(dev):
        opt.step(loss)
        loss()  # the final gradient, to say whether the fit converged
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    if grad > 10 * TOLERANCE:
        warnings.warn(f"linear probe stopped after steps={steps} with gradient {grad:.1e}; "
                      "its accuracy may move with more steps", RuntimeWarning, stacklevel=2)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(1)
    return float((pred == yte).double().mean())


def _rows(fit_rows: Any, n: int) -> np.ndarray | None:
    """``fit_rows`` as sorted, distinct row indices into ``n`` rows (None: all rows)."""
    if fit_rows is None:
        return None
    rows = _array(fit_rows)  # a tensor on any device too
    if rows.dtype == bool and rows.shape == (n,):
        rows = np.flatnonzero(rows)
    if (rows.ndim != 1 or not len(rows) or rows.dtype.kind not in "iu"
            or rows.min() < -n or rows.max() >= n):
        raise UserError(f"fit_rows={fit_rows!r} must be row indices (or a boolean mask) "
                        f"into the {n} rows of x, at least one; e.g. the training rows")
    return np.unique(rows % n)


def _epsilon(x: Any) -> float:
    """The machine epsilon of ``x``'s dtype; 0 for integers, which hold their values exactly."""
    dtype = x.dtype if isinstance(x, torch.Tensor | np.ndarray) else np.asarray(x).dtype
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def remove_top_pcs(x: Any, k: int, *, fit_rows: Any = None) -> np.ndarray:
    """``x`` ``(n, p)`` centred, minus its top-``k`` principal components: float64 ``(n, p)``,
    ``X - U_k S_k V_k'`` for the centred ``X = U S V'`` (``k = 0``: ``x`` centred).

    ``fit_rows`` (indices or a boolean mask, e.g. a probe's training rows): the mean and the
    components are those of these rows, and every row is centred on that mean and projected
    off those components, ``(x - m) (I - V_k V_k')``, so that the other rows (a test split)
    take no part in the fit. ``k`` at or above the rank of the fitting rows leaves all zeros.
    """
    t = _matrix(x, "x", torch.device("cpu") if not isinstance(x, torch.Tensor) else x.device)
    n, p = t.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # 1.0 failed in slicing
        raise UserError(f"k={k!r} must be a whole number of components, 0 <= k <= {min(n, p)}")
    if not 0 <= k <= min(n, p):
        raise UserError(f"k={k} is out of range for x of shape {(n, p)}; pass 0 <= k <= "
                        f"{min(n, p)}")
    rows = _rows(fit_rows, n)
    fit = t if rows is None else t[torch.as_tensor(rows, device=t.device)]
    xc = t - fit.mean(0)
    if k == 0:
        return xc.cpu().numpy()
    fc = xc if rows is None else xc[torch.as_tensor(rows, device=t.device)]
    with _one_thread(t.device):
        if rows is None and p > n:  # top left singular vectors: eigenvectors of the Gram
            u = torch.linalg.eigh(xc @ xc.T).eigenvectors[:, -k:]  # (ascending)
            out = xc - u @ (u.T @ xc)
        elif p > len(fc):  # right singular vectors: span of X'U from the fitting rows' Gram,
            # orthonormalised (beyond their rank X'U has noise columns, not orthogonal ones)
            v = torch.linalg.qr(fc.T @ torch.linalg.eigh(fc @ fc.T).eigenvectors[:, -k:])[0]
            out = xc - (xc @ v) @ v.T
        else:
            v = torch.linalg.eigh(fc.T @ fc).eigenvectors[:, -k:]
            out = xc - (xc @ v) @ v.T
    # k at or above the rank of the fitting rows leaves only rounding noise of theirs, which
    # standardise() would blow up to unit scale for the probe and CKA read as signal, and the
    # components beyond that rank are arbitrary directions, so no row has a defined rest:
    # it is nothing, zeros. 1e-9: far above float64 rounding. A float32 (or float16) input
    # was rounded before it came here: about 0.3 eps of each raw value, far above 1e-9 (a
    # float32 low-rank layer left ~1e-8 of its norm), so 4 eps of the raw rows' norm too.
    cut = max(1e-9 * float(fc.norm()), 4 * _epsilon(x) * float(fit.norm()))
    left = out if rows is None else out[torch.as_tensor(rows, device=t.device)]
    if float(left.norm()) <= cut:
        out = torch.zeros_like(out)
    return out.cpu().numpy()


@dataclass
class LayerProbes:
    """Per-layer probes: rows follow ``layers``, columns ``ks`` (principal components deleted,
    0 first); NaN where a layer has fewer than ``k``. ``accuracy``: probe test accuracy;
    ``self_cka``: CKA of the layer with itself after the deletion; ``match_layers``: each
    layer's best reference layer, ``match_cka``: CKA with it after the deletion (both None
    without a reference). Arrays are ``(L, K)``."""

    layers: list[str]
    ks: list[int]
    accuracy: np.ndarray
    self_cka: np.ndarray
    match_layers: list[str] | None
    match_cka: np.ndarray | None
    n_train: int
    n_test: int
    seed: int
    weight_decay: float
    steps: int
    estimator: str

    def to_dict(self) -> dict:
        """JSON-able, NaN as None (numpy scalars given as options too: seed=np.int64(1))."""
        from repsim.sketch import jsonable

        return jsonable(asdict(self))


def stratified_split(labels: Any, train_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, test)`` row indices: ``round(train_fraction * count)`` of every class
    for training, drawn by ``seed`` (:func:`repsim.data.balanced_subset`), the rest for test."""
    from repsim.data import balanced_subset

    if not 0 < train_fraction < 1:  # else balanced_subset's message names its own fraction=
        raise UserError(f"train_fraction={train_fraction} is out of range; pass a fraction in "
                        "(0, 1), e.g. 0.5")
    labels = _array(labels)
    counts = np.unique(labels, return_counts=True)[1]
    if not any(round(train_fraction * c) for c in counts):  # else "fraction=" again, below
        raise UserError(f"train_fraction={train_fraction} selects no training rows from "
                        f"classes of at most {counts.max(initial=0)} rows; pass a larger "
                        "fraction, or more rows")
    train = balanced_subset(labels, train_fraction, seed)
    test = np.setdiff1d(np.arange(len(labels)), train)
    if len(test) == 0:
        raise UserError(f"train_fraction={train_fraction} leaves no test rows; pass a "
                        "fraction below 1, e.g. 0.5")
    return train, test


def probe_layers(features: dict[str, Any], labels: Any, *, ks: Sequence[int] = DEFAULT_KS,
                 reference: dict[str, Any] | None = None, train_fraction: float = 0.5,
                 seed: int = 0, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                 steps: int = DEFAULT_STEPS, estimator: str = "debiased",
                 batch_size: int | None = None, batch_seed: int = 0,
                 device: str | torch.device | None = None) -> LayerProbes:
    """Probe every layer of ``features`` (``{layer: (n, p)}``, ``labels`` ``(n,)``) as it is and
    without its top ``k`` principal components for each ``k`` in ``ks``. The probe trains on a
    stratified ``train_fraction`` of the rows (drawn by ``seed``), tests on the rest, with the
    components it deletes fitted on its training rows; CKA's deletions use all rows.
    ``reference``: another model's ``{layer: (n, q)}`` on the same rows. ``estimator``,
    ``batch_size``, ``batch_seed``: as in :func:`repsim.cka.cka_matrix`."""
    from repsim.cka import cka_matrix

    labels = _array(labels).ravel()
    given = ks  # int(1.5) or True would delete one component, "15" one and five
    ks = list(ks) if isinstance(ks, Iterable) and not isinstance(ks, str) else [None]
    if not all(is_whole(k, 0) for k in ks):
        raise UserError(f"ks={given!r} must be a list of non-negative integers (components "
                        "to delete), e.g. ks=(1, 5, 10)")
    ks = [0] + sorted({int(k) for k in ks} - {0})
    mats = {name: _array(x) for name, x in features.items()}
    for name, x in mats.items():  # else remove_top_pcs refused it as "x", a name not given
        if x.ndim != 2:
            raise UserError(f"layer {name!r} has shape {x.shape}; pass (n, p) matrices, one "
                            "row per sample (pool or flatten maps first, e.g. repsim.extract "
                            "with reduce='mean')")
    if any(len(x) != len(labels) for x in mats.values()):
        raise UserError(f"features have {sorted({len(x) for x in mats.values()})} rows but "
                        f"labels has {len(labels)}; pass one label per row")
    train, test = stratified_split(labels, train_fraction, seed)
    opts = dict(estimator=estimator, batch_size=batch_size, batch_seed=batch_seed)
    ref_names, match = list(reference or {}), None
    ref = [_array(r) for r in (reference or {}).values()]
    if reference is not None:  # each layer's best match: its highest CKA before deletion
        match = [int(np.nanargmax(r)) if np.isfinite(r).any() else None
                 for r in cka_matrix(mats, dict(zip(ref_names, ref)), **opts)]
    acc, self_cka, match_cka = (np.full((len(mats), len(ks)), np.nan) for _ in range(3))
    for i, (name, x) in enumerate(mats.items()):
        _check_finite(torch.as_tensor(x), f"layer {name!r}")
        usable = [k for k in ks if k <= min(x.shape)]
        cols = [ks.index(k) for k in usable]
        # The probe's deletion is fitted on its training rows alone, as standardise() is:
        # components fitted on all rows let the test rows choose what the probe trains on.
        acc[i, cols] = [linear_probe(r[train], labels[train], r[test], labels[test],
                                     weight_decay=weight_decay, steps=steps, device=device)
                        for r in (remove_top_pcs(x, k, fit_rows=train) for k in usable)]
        removed = [remove_top_pcs(x, k) for k in usable]  # CKA has no split: all rows
        others = [x] + ([ref[match[i]]] if match and match[i] is not None else [])
        with _one_thread():  # small CKAs: 0.5 s on one thread, 1.9 s on two (shared CPU)
            c = cka_matrix(removed, others, **opts)  # (len(usable), 1 or 2)
        self_cka[i, cols] = c[:, 0]
        if c.shape[1] > 1:
            match_cka[i, cols] = c[:, 1]
    return LayerProbes(
        list(mats), ks, acc, self_cka,
        None if match is None else [None if j is None else ref_names[j] for j in match],
        None if match is None else match_cka, len(train), len(test), seed, weight_decay,
        steps, estimator)


def probe_model(model: Any, images: Any, labels: Any, *, layers: str | Sequence[str] | None
                = None, reduce: str = "mean", batch_size: int = 128,
                device: str | torch.device | None = None, **options: Any) -> LayerProbes:
    """:func:`probe_layers` of ``model``'s ``layers`` over ``images``, their features from
    :func:`repsim.extract` (``reduce="mean"``: mean-pooled tokens, average-pooled maps).
    ``model`` and ``images`` as :func:`repsim.extract` takes them; ``options`` go to
    :func:`probe_layers`."""
    from repsim.hooks import extract

    feats = extract(model, images, layers=layers, reduce=reduce, batch_size=batch_size,
                    device=device)
    return probe_layers(feats, labels, device=device, **options)
