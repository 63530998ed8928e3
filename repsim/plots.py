"""The study's figures, drawn from plain data (matrices, layer names, labels): no I/O but
:func:`save`.

Conventions for every CKA panel: rows are model A's layers (first layer at the bottom),
columns are model B's, both axes carry the layer names, the axis labels carry the model
names, and one colour scale runs from 0 to 1 (values outside it are clipped in colour only;
the data files keep them) with a colour bar. NaN cells (a zero-variance layer) are grey.

Files are written deterministically: no creation dates, fixed DPI, so the same data gives
the same bytes.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from repsim import paths  # noqa: E402

CMAP = "magma"
DPI = 150
ANNOTATE_MAX_CELLS = 64  # write the value in each cell when the matrix is this small


def _cmap():
    return plt.get_cmap(CMAP).with_extremes(bad="#c8c8c8")


def _matrix(values) -> np.ndarray:
    """Rows of floats or None (JSON) -> float64 array with NaN."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in values],
                    dtype=np.float64).reshape(len(values), -1)


def describe(kernel: str, estimator: str, n: int, batch_size: int | None = None) -> str:
    """Title fragment, e.g. ``linear CKA, minibatch estimator (batch 256), n = 1000``."""
    est = f"{estimator} estimator" + (f" (batch {batch_size})" if batch_size else "")
    return f"{kernel} CKA, {est}, n = {n:,}"


def draw_heatmap(ax, matrix, layers_a: Sequence[str], layers_b: Sequence[str], label_a: str,
                 label_b: str, annotate: bool | None = None, fontsize: float = 8):
    """One CKA heatmap on ``ax``: ``matrix`` is ``(len(layers_a), len(layers_b))``."""
    m = _matrix(matrix) if not isinstance(matrix, np.ndarray) else matrix
    if m.shape != (len(layers_a), len(layers_b)):
        raise ValueError(f"matrix {m.shape} does not match {len(layers_a)} x {len(layers_b)} "
                         "layer names")
    im = ax.imshow(np.ma.masked_invalid(m), origin="lower", cmap=_cmap(),
                   norm=Normalize(0.0, 1.0), aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(layers_b)), labels=list(layers_b), rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(layers_a)), labels=list(layers_a), fontsize=fontsize)
    ax.set_xlabel(f"{label_b}: layer")
    ax.set_ylabel(f"{label_a}: layer")
    if annotate is None:
        annotate = m.size <= ANNOTATE_MAX_CELLS
    if annotate:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = m[i, j]
                txt = "nan" if not np.isfinite(v) else f"{v:.2f}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=fontsize - 1,
                        color="black" if np.isfinite(v) and v > 0.6 else "white")
    return im


def _colorbar(fig, im, axes, values: np.ndarray) -> None:
    finite = values[np.isfinite(values)]
    tol = 1e-9  # a self-similarity of 1 + rounding is not "beyond the scale"
    lo = bool(finite.size and finite.min() < -tol)
    hi = bool(finite.size and finite.max() > 1 + tol)
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
              (True, True): "both"}[(lo, hi)]
    cb = fig.colorbar(im, ax=axes, extend=extend, shrink=0.9)
    cb.set_label("CKA")


def cka_heatmap(result: dict) -> plt.Figure:
    """The heatmap of one ``repsim cka`` result (the dict written to its JSON file)."""
    m = _matrix(result["matrix"])
    la, lb = result["layers_a"], result["layers_b"]
    w = min(14.0, 2.8 + 0.45 * len(lb))
    h = min(12.0, 2.4 + 0.4 * len(la))
    fig, ax = plt.subplots(figsize=(w, h), layout="constrained")
    im = draw_heatmap(ax, m, la, lb, result["model_a"], result["model_b"])
    _colorbar(fig, im, ax, m)
    ax.set_title(f"{result['model_a']} vs {result['model_b']}\n"
                 + describe(result["kernel"], result["estimator"], result["n"],
                            result.get("batch_size")), fontsize=10)
    return fig


def cka_grid(labels: Sequence[str], panels: dict[tuple[int, int], dict], title: str) -> plt.Figure:
    """A ``k x k`` grid: panel ``(i, j)`` is model ``i`` (rows) against model ``j`` (columns).

    ``panels[(i, j)]`` holds ``matrix``, ``layers_a``, ``layers_b``; one shared colour scale
    and one colour bar for the whole grid.
    """
    k = len(labels)
    size = 3.2 if k > 2 else 3.6
    fig, axes = plt.subplots(k, k, figsize=(size * k + 1.2, size * k + 0.6),
                             layout="constrained", squeeze=False)
    im = None
    values = []
    for i in range(k):
        for j in range(k):
            p = panels[(i, j)]
            m = _matrix(p["matrix"])
            values.append(m.ravel())
            im = draw_heatmap(axes[i, j], m, p["layers_a"], p["layers_b"], labels[i],
                              labels[j], annotate=False, fontsize=6)
            axes[i, j].set_title("self" if i == j else f"{labels[i]} vs {labels[j]}",
                                 fontsize=8)
    _colorbar(fig, im, axes, np.concatenate(values))
    fig.suptitle(title, fontsize=11)
    return fig


def best_match_curve(matrix) -> tuple[np.ndarray, np.ndarray]:
    """For each row (layer of A) the best-matching column (layer of B) and its CKA.

    Returns ``(index (La,) int, value (La,) float)``; a row that is all NaN gives -1, NaN.
    """
    m = _matrix(matrix) if not isinstance(matrix, np.ndarray) else matrix
    idx = np.full(m.shape[0], -1, dtype=np.int64)
    val = np.full(m.shape[0], np.nan)
    for i, row in enumerate(m):
        if np.isfinite(row).any():
            idx[i] = int(np.nanargmax(row))
            val[i] = row[idx[i]]
    return idx, val


def best_match(curves: Sequence[dict], title: str) -> plt.Figure:
    """"Diagonal" curves: one column per curve dict (``label_a``, ``label_b``, ``layers_a``,
    ``layers_b``, ``index``, ``value``). Top: the best-matching layer of B for each layer of A,
    with the proportional-depth diagonal dashed; bottom: that best CKA (0 to 1)."""
    k = len(curves)
    fig, axes = plt.subplots(2, k, figsize=(4.6 * k, 6.4), layout="constrained",
                             squeeze=False, height_ratios=[2, 1])
    for c, cur in enumerate(curves):
        la, lb = cur["layers_a"], cur["layers_b"]
        x = np.arange(len(la))
        idx = np.asarray(cur["index"], dtype=float)
        idx[idx < 0] = np.nan
        top, bottom = axes[0, c], axes[1, c]
        span = (len(lb) - 1) / max(1, len(la) - 1)
        top.plot(x, x * span, ls="--", color="0.6", lw=1, label="proportional depth")
        top.plot(x, idx, marker="o", color="C0", label="best match")
        top.set_yticks(range(len(lb)), labels=list(lb), fontsize=7)
        top.set_xticks(x, labels=list(la), rotation=90, fontsize=7)
        top.set_ylabel(f"{cur['label_b']}: best-matching layer")
        top.set_title(f"{cur['label_a']} -> {cur['label_b']}", fontsize=9)
        top.legend(fontsize=7, loc="upper left")
        bottom.plot(x, np.asarray(cur["value"], dtype=float), marker="o", color="C1")
        bottom.set_ylim(0, 1)
        bottom.set_xticks(x, labels=list(la), rotation=90, fontsize=7)
        bottom.set_xlabel(f"{cur['label_a']}: layer")
        bottom.set_ylabel("CKA of best match")
        bottom.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return fig


def data_scale(base_label: str, entries: Sequence[dict], title: str) -> plt.Figure:
    """Models trained on fractions of the data against the full-data one.

    ``entries``: dicts with ``fraction``, ``label``, ``matrix`` (rows: the fraction model's
    layers, columns: the base model's), ``layers_a``, ``layers_b``, sorted by fraction. Top
    row: one heatmap per fraction (shared scale); bottom: CKA between same-named layers
    against the fraction, one line per layer.
    """
    k = len(entries)
    fig = plt.figure(figsize=(3.6 * k + 1.4, 7.4), layout="constrained")
    sub = fig.subfigures(2, 1, height_ratios=[1.15, 1])
    axes = np.atleast_1d(sub[0].subplots(1, k, squeeze=False)[0])
    values, im = [], None
    for ax, e in zip(axes, entries):
        m = _matrix(e["matrix"])
        values.append(m.ravel())
        im = draw_heatmap(ax, m, e["layers_a"], e["layers_b"], e["label"], base_label,
                          annotate=False, fontsize=6)
        ax.set_title(f"{e['fraction']:g} of the data", fontsize=9)
    _colorbar(sub[0], im, list(axes), np.concatenate(values))
    ax = sub[1].subplots()
    fracs = [e["fraction"] for e in entries]
    shared = [n for n in entries[0]["layers_a"] if all(n in e["layers_a"] and n in e["layers_b"]
                                                       for e in entries)]
    for n_i, name in enumerate(shared):
        ys = []
        for e in entries:
            m = _matrix(e["matrix"])
            ys.append(m[e["layers_a"].index(name), e["layers_b"].index(name)])
        ax.plot(fracs, ys, marker="o", label=name, color=plt.get_cmap("viridis")(
            n_i / max(1, len(shared) - 1)))
    if len(set(fracs)) > 1 and min(fracs) > 0:
        ax.set_xscale("log")
        ax.minorticks_off()  # only the fractions themselves are labelled
    ax.set_xticks(fracs, labels=[f"{f:g}" for f in fracs])
    ax.set_ylim(0, 1)
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel(f"CKA(layer, same layer of {base_label})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="layer", title_fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def table(rows: Sequence[dict], columns: Sequence[str]) -> tuple[str, str]:
    """``(markdown, csv)`` of ``rows`` (dicts) in ``columns`` order; None prints as ``-``."""
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return "\n".join(md) + "\n", buf.getvalue()


def save(fig: plt.Figure, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically, without dates; close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext, meta in (("png", {"Software": None}),
                      ("pdf", {"CreationDate": None, "ModDate": None, "Producer": None,
                               "Creator": None})):
        path = stem.with_name(f"{stem.name}.{ext}")
        out.append(paths.atomic_write(path, lambda tmp, ext=ext, meta=meta: fig.savefig(
            tmp, format=ext, dpi=DPI, metadata=meta)))
    plt.close(fig)
    return out
