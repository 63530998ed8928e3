"""Every picture repsim draws, from plain arrays and names; no I/O but :func:`save`.

CKA panels: rows are model A's layers (first at the bottom), columns model B's; one colour
scale from 0 to 1 (values outside it clipped in colour only); NaN cells are grey. Files carry
no dates and a fixed DPI, so the same data gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
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
ALPHA = 0.05  # heatmaps mark cells whose permutation p-value is above this


def _matrix(values) -> np.ndarray:
    """Rows of floats or None (JSON) -> float64 array with NaN."""
    return np.array(values, dtype=np.float64).reshape(len(values), -1)  # None -> NaN


def _shade(k: int, n: int):
    """The ``k``-th of ``n`` viridis colours (curves ordered by depth or fraction)."""
    return plt.get_cmap("viridis")(k / max(1, n - 1))


def _label_room(names: Sequence[str], fontsize: float) -> float:
    """Inches the longest of ``names`` takes as tick labels at ``fontsize`` (about 0.6 em a
    character): figures grow by it, else long layer names squeeze the panels to nothing."""
    return 0.6 * fontsize / 72 * max((len(str(n)) for n in names), default=0)


def describe(kernel: str, estimator: str, n: int, batch_size: int | None = None) -> str:
    """Title fragment, e.g. ``linear CKA, minibatch estimator (batch 256), n = 1,000``."""
    est = f"{estimator} estimator" + (f" (batch {batch_size})" if batch_size else "")
    return f"{kernel} CKA, {est}, n = {n:,}"


def spec_title(spec: dict, default: str, c: dict | None = None, n: int | None = None) -> str:
    """A figure spec's title (or ``default``), with its CKA settings ``c`` and n below."""
    title = spec.get("title") or default
    if c is None:
        return title
    return f"{title}\n{describe(c['kernel'], c['estimator'], n, c['batch_size'])}"


def draw_heatmap(ax, matrix, layers_a: Sequence[str], layers_b: Sequence[str], label_a: str,
                 label_b: str, annotate: bool | None = None, fontsize: float = 8,
                 null=None):
    """One CKA heatmap on ``ax``: ``matrix`` is ``(len(layers_a), len(layers_b))``; cells
    where ``null`` (same shape, bool) is true get a white dot: not above the null."""
    m = matrix if isinstance(matrix, np.ndarray) else _matrix(matrix)
    if m.shape != (len(layers_a), len(layers_b)):
        raise ValueError(f"matrix {m.shape} does not match {len(layers_a)} x {len(layers_b)} "
                         "layer names")
    im = ax.imshow(np.ma.masked_invalid(m), origin="lower", norm=Normalize(0.0, 1.0),
                   cmap=plt.get_cmap(CMAP).with_extremes(bad="#c8c8c8"), aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(layers_b)), labels=list(layers_b), rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(layers_a)), labels=list(layers_a), fontsize=fontsize)
    ax.set(xlabel=f"{label_b}: layer", ylabel=f"{label_a}: layer")
    if annotate or (annotate is None and m.size <= ANNOTATE_MAX_CELLS):
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}" if np.isfinite(v) else "nan", ha="center", va="center",
                    fontsize=fontsize - 1,
                    color="black" if np.isfinite(v) and v > 0.6 else "white")
    if null is not None and np.any(null):
        i, j = np.nonzero(null)
        ax.scatter(j, i + (0.3 if m.size <= ANNOTATE_MAX_CELLS else 0), s=6, c="white",
                   edgecolors="black", linewidths=0.3)
    return im


def cka_extend(values: np.ndarray) -> str:
    """A colour bar's ``extend`` for CKA ``values`` on the 0..1 scale: an arrow at each end
    that some value passes (CKA is never clamped, so unbiased estimates can fall below 0)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    tol = 1e-9  # a self-similarity of 1 + rounding is not "beyond the scale"
    lo, hi = bool(np.any(finite < -tol)), bool(np.any(finite > 1 + tol))
    return "both" if lo and hi else "min" if lo else "max" if hi else "neither"


def _colorbar(fig, im, axes, values: np.ndarray) -> None:
    fig.colorbar(im, ax=axes, extend=cka_extend(values), shrink=0.9).set_label("CKA")


def _curve_axis(ax, layers: Sequence[str] | None = None, top: float = 1.0, **labels) -> None:
    """A curve panel: ``layers`` as ticks, a y range holding 0..``top`` (unclamped CKA can
    fall below 0, or pass 1 on few images), ``labels`` (``xlabel=``, ``ylabel=``), a grid."""
    if layers is not None:
        ax.set_xticks(range(len(layers)), labels=list(layers), rotation=90, fontsize=7)
    lo, hi = ax.get_ylim()
    ax.set(ylim=(min(0.0, lo), max(top, hi)), **labels)
    ax.grid(alpha=0.3)


def cka_heatmap(result: dict) -> plt.Figure:
    """The heatmap of one ``repsim cka`` result (the dict written to its JSON file)."""
    m = _matrix(result["matrix"])
    la, lb = result["layers_a"], result["layers_b"]
    fig, ax = plt.subplots(figsize=(max(min(14.0, 2.8 + 0.45 * len(lb)), 2.6 + _label_room(la, 8)),
                                    max(min(12.0, 2.4 + 0.4 * len(la)), 2.4 + _label_room(lb, 8))),
                           layout="constrained")
    im = draw_heatmap(ax, m, la, lb, result["model_a"], result["model_b"],
                      null=_not_above_null(result))
    _colorbar(fig, im, ax, m)
    legend = "" if result.get("p_value") is None else "\n" + null_legend(result["permutations"])
    ax.set_title(f"{result['model_a']} vs {result['model_b']}\n"
                 + describe(result["kernel"], result["estimator"], result["n"],
                            result.get("batch_size")) + legend, fontsize=10)
    return fig


def _not_above_null(result: dict) -> np.ndarray | None:
    """Cells whose permutation p-value is above ``ALPHA`` (or NaN); None without a null."""
    return None if result.get("p_value") is None else ~(_matrix(result["p_value"]) <= ALPHA)


def null_legend(permutations: int) -> str:
    return f"dot: not above the permutation null (p > {ALPHA}, {permutations} permutations)"


def cka_grid(labels: Sequence[str], panels: dict[tuple[int, int], dict], title: str) -> plt.Figure:
    """A ``k x k`` grid: panel ``(i, j)`` (``matrix``, ``layers_a``, ``layers_b``) is model
    ``i`` (rows) against model ``j`` (columns); one colour bar for the whole grid."""
    k = len(labels)
    names = [n for p in panels.values() for n in (*p["layers_a"], *p["layers_b"])]
    size = max(3.2 if k > 2 else 3.6, 2.0 + _label_room(names, 6))
    fig, axes = plt.subplots(k, k, figsize=(size * k + 1.2, size * k + 0.6),
                             layout="constrained", squeeze=False)
    im, values = None, []
    for (i, j), ax in np.ndenumerate(axes):
        p = panels[(i, j)]
        m = _matrix(p["matrix"])
        values.append(m.ravel())
        im = draw_heatmap(ax, m, p["layers_a"], p["layers_b"], labels[i], labels[j],
                          annotate=False, fontsize=6, null=_not_above_null(p))
        ax.set_title("self" if i == j else f"{labels[i]} vs {labels[j]}", fontsize=8)
    _colorbar(fig, im, axes, np.concatenate(values))
    fig.suptitle(title, fontsize=11, wrap=True)
    return fig


def best_match_curve(matrix) -> tuple[np.ndarray, np.ndarray]:
    """For each row (layer of A) the best-matching column (layer of B) and its CKA:
    ``(index (La,) int, value (La,) float)``; a row that is all NaN gives -1, NaN."""
    m = matrix if isinstance(matrix, np.ndarray) else _matrix(matrix)
    idx = np.full(m.shape[0], -1, dtype=np.int64)
    val = np.full(m.shape[0], np.nan)
    for i, row in enumerate(m):
        if np.isfinite(row).any():
            idx[i] = int(np.nanargmax(row))
            val[i] = row[idx[i]]
    return idx, val


def best_matches(result: dict) -> dict:
    """Each row's best match in a CKA result: ``index`` (-1 for an all-NaN row), ``value``
    and ``se`` (None where NaN or absent), as JSON lists."""
    idx, val = best_match_curve(result["matrix"])
    se = result.get("se")
    return {"index": idx.tolist(), "value": [None if v != v else float(v) for v in val],
            "se": [se[i][j] if se and j >= 0 else None for i, j in enumerate(idx.tolist())]}


def best_match(curves: Sequence[dict], title: str) -> plt.Figure:
    """"Diagonal" curves, one column per curve (``label_a``, ``label_b``, ``layers_a``,
    ``layers_b``, ``index``, ``value``). Top: the best-matching layer of B for each layer of A,
    the proportional-depth diagonal dashed; bottom: that best CKA (0 to 1, or below 0)."""
    la_all = [n for c in curves for n in c["layers_a"]]
    lb_all = [n for c in curves for n in c["layers_b"]]
    width = max(4.6, 3.6 + _label_room(lb_all, 7))
    fig, axes = plt.subplots(2, len(curves), figsize=(width * len(curves),
                                                      max(6.4, 4.6 + 2 * _label_room(la_all, 7))),
                             layout="constrained", squeeze=False, height_ratios=[2, 1])
    for (top, bottom), cur in zip(axes.T, curves):
        la, lb = cur["layers_a"], cur["layers_b"]
        x = np.arange(len(la))
        idx = np.asarray(cur["index"], float)
        idx[idx < 0] = np.nan
        span = (len(lb) - 1) / max(1, len(la) - 1)
        top.plot(x, x * span, ls="--", color="0.6", lw=1, label="proportional depth")
        top.plot(x, idx, marker="o", color="C0", label="best match")
        top.set_yticks(range(len(lb)), labels=list(lb), fontsize=7)
        top.set_xticks(x, labels=list(la), rotation=90, fontsize=7)
        top.set_ylabel(f"{cur['label_b']}: best-matching layer")
        top.set_title(f"{cur['label_a']} -> {cur['label_b']}", fontsize=9)
        top.legend(fontsize=7, loc="upper left")
        se = np.array(cur.get("se") or [None] * len(x), float)
        bottom.errorbar(x, np.array(cur["value"], float), yerr=se, marker="o", color="C1",
                        capsize=2)  # +-1 jackknife SE
        _curve_axis(bottom, la, xlabel=f"{cur['label_a']}: layer",
                    ylabel="CKA of best match (+-1 SE)")
    fig.suptitle(title, fontsize=11, wrap=True)
    return fig


def _fractions_axis(ax, fracs: Sequence[float]) -> None:
    """A log axis labelled at exactly the training-set fractions."""
    if len(set(fracs)) > 1 and min(fracs) > 0:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(sorted(set(fracs)), labels=[f"{f:g}" for f in sorted(set(fracs))])


def data_scale(panels: Sequence[dict], title: str) -> plt.Figure:
    """One row per base model (``panels``: ``label``, ``entries`` by ``fraction``,
    ``base_accuracy``, ``missing`` fractions). Left: each fraction model's CKA with the same
    layer of the full-data one, along the depth (+-1 SE); right: test accuracy by fraction,
    the full-data model at 1, a dotted line at each missing fraction."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(11.0, 3.9 * len(panels) + 0.9),
                             layout="constrained", squeeze=False, width_ratios=[1.6, 1])
    for (left, right), p in zip(axes, panels):
        layers = p["entries"][0]["layers"] if p["entries"] else []
        for k, e in enumerate(p["entries"]):
            acc = "" if e["test_accuracy"] is None else f", {e['test_accuracy']:.1f} %"
            left.errorbar(range(len(e["layers"])), np.array(e["cka"], float),
                          yerr=np.array(e["se"], float), marker="o", capsize=2,
                          color=_shade(k, len(p["entries"])),
                          label=f"{e['fraction']:g} of the data{acc}")
        _curve_axis(left, layers, ylabel=f"CKA(layer, same layer of\n{p['label']} on all the data)")
        left.set_title(p["label"] + (f" (missing: {', '.join(f'{f:g}' for f in p['missing'])})"
                                     if p["missing"] else ""), fontsize=9)
        left.legend(fontsize=7, title="trained on (test accuracy)", title_fontsize=7)
        pts = sorted([(e["fraction"], e["test_accuracy"]) for e in p["entries"]
                      if e["test_accuracy"] is not None]
                     + ([(1.0, p["base_accuracy"])] if p["base_accuracy"] is not None else []))
        right.plot([f for f, _ in pts], [a for _, a in pts], marker="o", color="C3")
        for f, a in pts:
            right.annotate(f"{a:.1f}", (f, a), textcoords="offset points", xytext=(0, 5),
                           ha="center", fontsize=7)
        for f in p["missing"]:  # the planned runs that are not here, at their place
            right.axvline(f, ls=":", color="0.6")
            right.text(f, 0.03, " missing", transform=right.get_xaxis_transform(),
                       rotation=90, color="0.4", fontsize=7, ha="right", va="bottom")
        _fractions_axis(right, [f for f, _ in pts] + list(p["missing"]) or [1.0])
        right.set(xlabel="fraction of the training set", ylabel="test top-1 accuracy (%)")
        right.set_title(f"{p['label']}: accuracy", fontsize=9)
        right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11, wrap=True)
    return fig


def dynamics(models: Sequence[dict], title: str, settle: float) -> plt.Figure:
    """Training dynamics, one column per model (``label``, ``epochs``, ``layers``, ``cka``
    and ``settled_epoch`` per layer, ``test_accuracy`` and ``train_accuracy`` per epoch).
    Top: CKA of each layer at each snapshot epoch to the same layer of the final model, one
    curve per layer coloured by depth, the ``settle`` level dashed; bottom: accuracy (%)."""
    fig, axes = plt.subplots(2, len(models), figsize=(5.4 * len(models), 7.0),
                             layout="constrained", squeeze=False, height_ratios=[2, 1])
    for (top, bottom), m in zip(axes.T, models):
        x = m["epochs"]
        for k, name in enumerate(m["layers"]):
            when = m["settled_epoch"].get(name)
            # the snapshot at the final epoch is the final model itself (CKA 1)
            said = ("not yet" if when is None else "final model only"
                    if when == x[-1] == m["final_epoch"] else f"from {when}")
            top.plot(x, np.array(m["cka"][name], float), marker="o", ms=3,
                     color=_shade(k, len(m["layers"])), label=f"{name} ({said})")
        top.axhline(settle, ls="--", color="0.5", lw=0.8)
        _curve_axis(top, top=1.02, ylabel="CKA(layer at epoch, same layer final)")
        acc = m.get("final_test_accuracy")
        top.set_title(f"{m['label']}: final epoch {m['final_epoch']}"
                      + ("" if acc is None else f", test accuracy {acc:.1f} %"), fontsize=9)
        top.legend(fontsize=7, title=f"layer (CKA >= {settle:g} from epoch)",
                   title_fontsize=7, loc="lower right")
        for split, style, colour in (("test", "-", "C3"), ("train", "--", "0.5")):
            ys = np.array(m[f"{split}_accuracy"], float)
            if np.isfinite(ys).any():
                bottom.plot(x, ys, style, marker="o", ms=3, color=colour, label=split)
        bottom.set(ylabel="top-1 accuracy (%)", xlabel="epoch")
        if bottom.get_legend_handles_labels()[0]:  # none when no snapshot was evaluated
            bottom.legend(fontsize=7)
        for ax in (top, bottom):
            if max(x) > 10:  # snapshots are roughly log-spaced; epoch 0 needs symlog
                ax.set_xscale("symlog", linthresh=1.0)
                ax.minorticks_off()
            ax.set_xticks(x, labels=[str(e) for e in x], fontsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11, wrap=True)
    return fig


def table(rows: Sequence[dict], columns: Sequence[str]) -> tuple[str, str]:
    """``(markdown, csv)`` of ``rows`` (dicts) in ``columns`` order; None prints as ``-``."""
    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(md) + "\n", csv_text(rows, columns)


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """CSV of ``rows`` (dicts) in ``columns`` order, a header first; None is empty."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(
        [columns] + [["" if r.get(c) is None else r.get(c) for c in columns] for r in rows])
    return buf.getvalue()


# --------------------------------------------------------------------------- maps on images


def _bare(ax) -> None:
    ax.set(xticks=[], yticks=[])
    for s in ax.spines.values():
        s.set_visible(False)


def _overlay(ax, image: np.ndarray, grid_map: np.ndarray) -> None:
    """``image`` with ``grid_map`` on top: upsampled bilinearly (cell centres aligned) and
    min-max scaled (a constant map shows as zeros)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(grid_map, dtype=np.float32))[None, None]
    heat = F.interpolate(t, size=image.shape[:2], mode="bilinear", align_corners=False)
    heat = heat[0, 0].numpy().astype(np.float64)
    lo, hi = float(heat.min()), float(heat.max())
    ax.imshow(image, interpolation="nearest")
    ax.imshow(np.zeros_like(heat) if hi <= lo else (heat - lo) / (hi - lo), cmap="inferno",
              alpha=0.55, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set(xticks=[], yticks=[])


def _image_rows(images: np.ndarray, rows: int, cols: int, ids, size: tuple[float, float],
                pad: float = 0.6, fontsize: float = 7):
    """A figure of ``rows`` x (1 + ``cols``) panels per image, the image in the first column
    labelled with its id."""
    n = len(images)
    fig, axes = plt.subplots(n * rows, cols + 1, squeeze=False,
                             figsize=(size[0] * (cols + 1), size[1] * n * rows + pad))
    for i in range(n * rows):
        axes[i, 0].imshow(images[i // rows], interpolation="nearest")
        _bare(axes[i, 0])
        axes[i, 0].set_ylabel(f"id {ids[i // rows]}" if ids is not None else f"image {i // rows}",
                              fontsize=fontsize)
    return fig, axes


def finish(fig, title: str) -> plt.Figure:
    """``fig`` with ``title`` (if any) above, laid out tightly."""
    if title:
        fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    return fig


def attention_heads(images: np.ndarray, maps: np.ndarray, blocks: Sequence[int],
                    title: str = "", ids: Sequence[int] | None = None) -> plt.Figure:
    """One row per (image, block): the image, then one overlay per head. ``images`` ``(N, H,
    W, 3)`` uint8, ``maps`` ``(N, len(blocks), heads, gh, gw)``; each panel min-max scaled
    (the colour shows where a head looks, not how much)."""
    n, nb, nh = maps.shape[:3]
    fig, axes = _image_rows(images, nb, nh, ids, (1.25, 1.3))
    for i, j in np.ndindex(n, nb):
        row = axes[i * nb + j]
        row[0].set_ylabel(f"{row[0].get_ylabel()}\nblock {blocks[j]}", fontsize=7)
        for h in range(nh):
            _overlay(row[h + 1], images[i], maps[i, j, h])
    for h in range(nh):
        axes[0, h + 1].set_title(f"head {h}", fontsize=7)
    return finish(fig, title)


def attention_rollout(images: np.ndarray, maps: dict[str, np.ndarray],
                      ids: Sequence[int] | None = None) -> plt.Figure:
    """One row per image: the image, then one rollout overlay per model (``maps``: ``{label:
    (N, gh, gw)}``), each min-max scaled."""
    fig, axes = _image_rows(images, 1, len(maps), ids, (1.9, 1.9), pad=0.5, fontsize=8)
    for j, (label, m) in enumerate(maps.items()):
        for i in range(len(images)):
            _overlay(axes[i, j + 1], images[i], m[i])
        axes[0, j + 1].set_title(label, fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    return finish(fig, "attention rollout (class token, Abnar & Zuidema 2020)")


def attention_distance(distances: dict[str, np.ndarray], unit: str = "pixels",
                       uniform: dict[str, float] | None = None, title: str = "") -> plt.Figure:
    """Mean attention distance of every head (points) against block (numbered from 0, as
    ``blocks.0`` and ``--layers 0``), one colour per model, the mean over heads as a line.
    ``distances``: ``{label: (L, H)}``; ``uniform`` (same unit) draws each model's
    uniform-attention distance dashed."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for j, (label, d) in enumerate(distances.items()):
        depth, heads = np.shape(d)
        x = np.arange(depth) + (j - (len(distances) - 1) / 2) * 0.12  # side by side
        ax.scatter(np.repeat(x, heads), np.ravel(d), s=14, alpha=0.75, color=f"C{j}",
                   label=f"{label} (heads)")
        ax.plot(x, np.mean(d, 1), color=f"C{j}", alpha=0.5, lw=1)
        if uniform and label in uniform:
            ax.hlines(uniform[label], -0.3, depth - 0.7, colors=f"C{j}", linestyles="dashed",
                      lw=0.8, alpha=0.7, label=f"{label}: uniform attention")
    ax.set(xlabel="block (blocks.i)", ylabel=f"mean attention distance\n({unit})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    top = max([float(np.max(d)) for d in distances.values()] + list((uniform or {}).values()))
    ax.set_ylim(0, 1.1 * top if top > 0 else 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    return finish(fig, "")


def feature_maps(images: np.ndarray, stage, title: str = "", ids: Sequence[int] | None = None
                 ) -> plt.Figure:
    """One row per image: the image, the stage's mean map, then its strongest channels.
    ``stage`` is a :class:`repsim.figures.featuremaps.StageMaps`. Channel maps of one image
    share one scale (0 to that row's maximum, from its minimum when negative), so their
    strengths compare; the mean map, much weaker, has its own. A colour bar right of each
    shows its scale."""
    k = stage.maps.shape[1]
    fig, axes = _image_rows(images, 1, k + 1, ids, (1.5, 1.3))  # wide: room for the bars
    for i, row in enumerate(axes):
        mean = row[1].imshow(stage.mean_map[i], cmap="viridis", interpolation="nearest")
        # 0 stays on the scale (post-ReLU maps: 0 to the maximum); a stage before its ReLU
        # has negative values, which a scale from 0 would paint as 0.
        vmin = min(0.0, float(stage.maps[i].min()))
        vmax = max(0.0, float(stage.maps[i].max()))
        vmax = vmax if vmax > vmin else vmin + 1.0  # an all-zero row
        for j in range(k):
            im = row[j + 2].imshow(stage.maps[i, j], cmap="viridis", vmin=vmin, vmax=vmax,
                                   interpolation="nearest")
            row[j + 2].set_title(f"ch {stage.channels[i, j]}", fontsize=6, pad=2)
        for ax in row[1:]:
            _bare(ax)
        for ax, mappable in ((row[1], mean), (row[-1], im)):
            # Insets: tight_layout makes room for them, the panels keep one size.
            bar = fig.colorbar(mappable, cax=ax.inset_axes((1.04, 0.0, 0.06, 1.0)))
            bar.ax.tick_params(labelsize=5, length=2, pad=1)
    axes[0, 0].set_title("input", fontsize=7)
    axes[0, 1].set_title(f"mean of {stage.num_channels}", fontsize=6, pad=2)
    return finish(fig, title)


# --------------------------------------------------------------------------- files


def training_curve(rows: Sequence[dict], title: str) -> plt.Figure:
    """Loss and accuracy per epoch, train and test, from a run's log rows."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for ax, metric, ylabel in zip(axes, ("loss", "accuracy"),
                                  ("cross-entropy", "top-1 accuracy (%)")):
        for split, style in (("train", "-"), ("test", "--")):
            pts = [r for r in rows if r.get(f"{split}_loss") is not None]  # test: evaluated epochs
            ax.plot([r["epoch"] for r in pts], [r[f"{split}_{metric}"] for r in pts], style,
                    marker=".", label=split)
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title} {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def save(fig: plt.Figure, stem: str | os.PathLike, provenance: dict | None = None,
         formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.<format>`` for each format atomically and without dates, close ``fig``.
    ``provenance`` (JSON-able) goes into the PNG's text chunk."""
    stem = Path(stem)
    meta = {"png": {"Software": None},
            "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}}
    if provenance is not None:
        meta["png"]["Description"] = json.dumps(provenance, default=str)
    try:
        return [paths.atomic_write(stem.with_name(f"{stem.name}.{ext}"), lambda tmp, ext=ext:
                                   fig.savefig(tmp, format=ext, dpi=DPI, metadata=meta[ext]))
                for ext in formats]
    finally:
        plt.close(fig)
