"""Figure kind ``locality``: how local a ViT's tokens are, and how its layers match a CNN's
place by place (:mod:`repsim.locality` computes). Writes ``<name>`` (per-place CKA and each
layer's locality), ``<name>_maps`` (per-token maps, Raghu et al. 2021, Section 7) and
``<name>.npz`` (every token's map).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle

from repsim.errors import UserError, is_whole
from repsim.figures import draw
from repsim.locality import Locality, relative_map

DEFAULT_IMAGES = 256  # (image, cell) rows: 256 x 64 = 16,384 for an 8x8 grid


def _mark(ax, r: float, c: float, size: float = 1.0) -> None:
    ax.add_patch(Rectangle((c - size / 2, r - size / 2), size, size, fill=False,
                           edgecolor="#00e5ff", lw=1.0, clip_on=False))


def summary_figure(loc: Locality, vit_label: str, cnn_label: str | None,
                   title: str) -> plt.Figure:
    """Left: the (image, cell) CKA heatmap, ViT layers (rows) x CNN layers (columns), when
    there is a CNN; right: own-patch CKA, mean CKA elsewhere and their difference per layer."""
    pos = loc.position
    cols = 2 if pos is not None else 1
    fig, axes = plt.subplots(1, cols, squeeze=False, figsize=(5.2 * cols, 4.6))
    if pos is not None:
        im = draw.draw_heatmap(axes[0, 0], pos.matrix, pos.layers_a, pos.layers_b, vit_label,
                               cnn_label or "CNN")
        fig.colorbar(im, ax=axes[0, 0], fraction=0.046, pad=0.04,
                     extend=draw.cka_extend(pos.matrix))
        how = draw.describe(pos.kernel, pos.estimator, pos.n, pos.batch_size)
        axes[0, 0].set_title(f"per place: {how}\nsamples = {loc.n:,} images x "
                             f"{loc.grid.cells} cells", fontsize=8)
    ax = axes[0, -1]
    x = np.arange(len(loc.map_layers))
    for key, style, label in (("own", "o-", "own patch (mean over tokens)"),
                              ("elsewhere", "s--", "other patches (mean)"),
                              ("contrast", "^-", "locality = own - elsewhere")):
        ax.plot(x, loc.summary[key], style, ms=4, lw=1.2, label=label)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xticks(x, labels=loc.map_layers, rotation=90, fontsize=8)
    ax.set_ylabel("CKA with input patches (across images)", fontsize=8)
    ax.set_title(f"{vit_label}: how local each token is (n = {loc.n:,} images)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return draw.finish(fig, title)


def maps_figure(loc: Locality, tokens: Sequence[tuple[int, int]], title: str) -> plt.Figure:
    """One row per layer: the locality maps of ``tokens`` (grid cells; the token's own cell
    outlined), then the mean map by offset from the token (own cell at the centre). One colour
    scale, CKA 0 to 1, for every panel (an arrow at an end that some value passes)."""
    gh, gw = loc.grid.grid
    rel = relative_map(loc.maps, (gh, gw))
    nl, nc = len(loc.map_layers), len(tokens) + 1
    # Fixed margins in inches (left: row labels, right: colour bar, top: titles): with
    # dozens of panels, an automatic layout costs more CPU than the maps themselves.
    w, h = 1.2 * nc + 1.5, 1.2 * nl + 0.75
    fig, axes = plt.subplots(nl, nc, squeeze=False, figsize=(w, h))
    fig.subplots_adjust(left=0.6 / w, right=1 - 0.9 / w, bottom=0.1 / h, top=1 - 0.65 / h,
                        wspace=0.1, hspace=0.12)
    norm, cmap = Normalize(0.0, 1.0), plt.get_cmap(draw.CMAP)
    for i, layer in enumerate(loc.map_layers):
        for j, (r, c) in enumerate(tokens):
            im = axes[i, j].imshow(loc.maps[i, r * gw + c].reshape(gh, gw), norm=norm, cmap=cmap,
                                   interpolation="nearest")
            _mark(axes[i, j], r, c)
        axes[i, -1].imshow(rel[i], norm=norm, cmap=cmap, interpolation="nearest")
        _mark(axes[i, -1], gh - 1, gw - 1)
        for ax in axes[i]:
            ax.set(xticks=[], yticks=[])
        axes[i, 0].set_ylabel(f"{layer}\nlocality {loc.summary['contrast'][i]:.2f}", fontsize=7)
    for j, (r, c) in enumerate(tokens):
        axes[0, j].set_title(f"token ({r}, {c})", fontsize=7)
    axes[0, -1].set_title("mean by offset", fontsize=7)
    bar_h = min(1.0, 4.0 / nl) * (1 - 0.75 / h)
    bar = fig.colorbar(im, cax=fig.add_axes((1 - 0.7 / w, 0.5 - bar_h / 2, 0.12 / w, bar_h)),
                       extend=draw.cka_extend(np.concatenate([loc.maps.ravel(), rel.ravel()])))
    bar.set_label("CKA", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9, wrap=True, y=1 - 0.12 / h, va="top")
    return fig


def _tokens(spec: dict, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The spec's ``tokens`` (grid cells to draw); default corner, edge and centre."""
    raw = spec.get("tokens")
    if raw is None:
        return [(0, 0), (0, grid[1] // 2), (grid[0] // 2, grid[1] // 2)]
    ok = isinstance(raw, list) and raw and all(
        isinstance(t, list) and len(t) == 2 and all(is_whole(v, 0) for v in t)
        and t[0] < grid[0] and t[1] < grid[1] for t in raw)
    if not ok:
        raise UserError(f"tokens={raw!r}; valid: a list of [row, col] cells of the "
                        f"{grid[0]}x{grid[1]} patch grid, e.g. [[0, 0], [4, 4]]")
    return [tuple(t) for t in raw]


def build_figure(spec: dict, ctx) -> list[Path]:
    """Figure kind ``locality``. Keys: ``vit`` (a ViT: name or model table), ``cnn``
    (optional: compared per place), ``max_images`` (a seeded random subset of the probe set,
    default 256), ``tokens`` (cells drawn, default corner, edge and centre)."""
    import torch

    from repsim import models
    from repsim.attention import model_device
    from repsim.data import subset_indices
    from repsim.locality import measure, token_grid
    from repsim.registry import get_spec

    refs = [ctx.model_ref(spec[k], spec) for k in ("vit", "cnn") if spec.get(k)]
    settings = ctx.cka_settings(spec)
    if settings.pop("permutations"):
        raise UserError("permutations is not supported by kind 'locality': its samples are "
                        "(image, cell) pairs, not independent images; leave it out of [cka]")
    # [probe] batch_size: images per forward pass, as in every kind's extraction; unset, the
    # 64 of measure (a figure built without it keeps its numbers).
    forward = {"forward_batch": ctx.probe_spec(spec).batch_size} if "batch_size" in (
        spec.get("probe") or {}) else {}
    if forward and forward["forward_batch"] < 1:
        raise UserError(f"{ctx.name}: [probe] batch_size={forward['forward_batch']} is not "
                        "valid; pass a positive integer (images per forward pass)")
    loaded = [ctx.model(r) for r in refs]  # a model without weights skips the figure here
    tokens = _tokens(spec, token_grid(loaded[0][0]).grid)  # spec errors before any work
    probe = ctx.images(ctx.probe_spec(spec))
    k = ctx.positive_int(spec, "max_images", DEFAULT_IMAGES)
    if k < 4:
        raise UserError(f"max_images={k}; valid: at least 4 images")
    pick = subset_indices(len(probe.images), k, ctx.probe_spec(spec).seed)
    images = torch.from_numpy(probe.images[pick])
    specs = [get_spec(r.model) for r in refs]
    with ctx.on_device([m for m, _ in loaded]) as on:
        xs = [models.preprocess(s, images.to(model_device(m))) for s, m in zip(specs, on)]
        loc = measure(on[0], xs[0], *(on[1:2] + xs[1:2]), vit_layers=refs[0].layers,
                      cnn_layers=refs[1].layers if len(refs) > 1 else None, vit_spec=specs[0],
                      cnn_spec=specs[1] if len(refs) > 1 else None, **forward, **settings)
    return _write(ctx, spec, loc, refs, probe.ids[pick], tokens)


def _write(ctx, spec: dict, loc: Locality, refs: list, ids: np.ndarray,
           tokens: list[tuple[int, int]]) -> list[Path]:
    from repsim import paths

    labels = [r.display() for r in refs]
    title = spec.get("title") or f"Spatial locality: {' vs '.join(labels)}"
    files = ctx.save(summary_figure(loc, labels[0], labels[1] if len(labels) > 1 else None,
                                   title))
    files += draw.save(maps_figure(loc, tokens, f"{labels[0]}: CKA of a token with the input "
                                   f"patch at every place, n = {loc.n:,} images"),
                       ctx.path("_maps"))
    files.append(paths.save_npz(ctx.path(".npz"), maps=loc.maps, ids=ids,
                                layers=np.asarray(loc.map_layers), grid=np.asarray(loc.grid.grid)))
    gw = loc.grid.grid[1]
    ctx.data.update({
        "labels": labels, "n_images": loc.n, "image_ids": [int(i) for i in ids],
        "grid": list(loc.grid.grid), "patch_size": list(loc.grid.patch_size),
        "layers": loc.map_layers,
        "summary": {k: np.round(v, 6).tolist() for k, v in loc.summary.items()},
        "token_maps": {f"{r},{c}": np.round(loc.maps[:, r * gw + c], 6).tolist()
                       for r, c in tokens},
        "relative_map": np.round(relative_map(loc.maps, loc.grid.grid), 6).tolist()})
    if loc.position is not None:
        ctx.data["position_cka"] = {k: v for k, v in loc.position.to_dict().items()
                                    if v is not None}
    return files
