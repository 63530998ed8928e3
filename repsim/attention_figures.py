"""Pictures of ViT attention, the ``repsim attention`` command and its ``repsim figures`` kind.

The measurements (capture, rollout, mean attention distance) are in :mod:`repsim.attention`;
this module draws them (per-head maps over the images, rollout maps, distance per block and
head), writes them with their data and provenance, and caches the distance per model,
weights and probe set.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repsim.attention import (
    attention_distance,
    attention_maps,
    distance_matrix,
    model_device,
    rollout,
    token_maps,
    vit_geometry,
)
from repsim.errors import UserError
from repsim.figures import figure_kind

FORMAT = "repsim-attention-distance/1"
UNITS = ("image", "model", "fraction")
DEFAULT_PROBE = 1000


# --------------------------------------------------------------------------- plots


def plot_attention_heads(images: np.ndarray, maps: np.ndarray, blocks: Sequence[int],
                         title: str = "", ids: Sequence[int] | None = None):
    """Figure: one row per (image, block), the image then one overlay per head.

    ``images`` ``(N, H, W, 3)`` uint8, ``maps`` ``(N, len(blocks), heads, gh, gw)``; every
    panel is min-max normalised (the colour shows where a head looks, not how much).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from repsim.viz import bare, overlay

    n, nb, nh = maps.shape[:3]
    fig, axes = plt.subplots(n * nb, nh + 1, figsize=(1.25 * (nh + 1), 1.3 * n * nb + 0.6),
                             squeeze=False)
    for i in range(n):
        for j, blk in enumerate(blocks):
            row = axes[i * nb + j]
            row[0].imshow(images[i], interpolation="nearest")
            bare(row[0])
            name = f"id {ids[i]}" if ids is not None else f"image {i}"
            row[0].set_ylabel(f"{name}\nblock {blk}", fontsize=7)
            for h in range(nh):
                overlay(row[h + 1], images[i], maps[i, j, h])
                if i == 0 and j == 0:
                    row[h + 1].set_title(f"head {h}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_rollout(images: np.ndarray, maps: dict[str, np.ndarray],
                 ids: Sequence[int] | None = None):
    """Figure: one row per image, the image then one rollout overlay per model.

    ``maps`` is ``{label: (N, gh, gw)}``; each panel is min-max normalised.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from repsim.viz import bare, overlay

    n = len(images)
    labels = list(maps)
    fig, axes = plt.subplots(n, len(labels) + 1, figsize=(1.9 * (len(labels) + 1), 1.9 * n + 0.5),
                             squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i], interpolation="nearest")
        bare(axes[i, 0])
        axes[i, 0].set_ylabel(f"id {ids[i]}" if ids is not None else f"image {i}", fontsize=8)
        for j, label in enumerate(labels):
            overlay(axes[i, j + 1], images[i], maps[label][i])
            if i == 0:
                axes[i, j + 1].set_title(label, fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    fig.suptitle("attention rollout (class token, Abnar & Zuidema 2020)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_attention_distance(distances: dict[str, np.ndarray], unit: str = "pixels",
                            uniform: dict[str, float] | None = None, title: str = ""):
    """Figure: mean attention distance of every head (points) against block (1-based), one
    colour per model, with the mean over heads as a line. ``distances`` is ``{label: (L, H)}``;
    ``uniform`` (same unit) draws each model's uniform-attention distance as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    k = len(distances)
    for j, (label, d) in enumerate(distances.items()):
        d = np.asarray(d)
        depth, heads = d.shape
        x = np.arange(1, depth + 1) + (j - (k - 1) / 2) * 0.12  # side by side, not on top
        color = f"C{j}"
        ax.scatter(np.repeat(x, heads), d.ravel(), s=14, alpha=0.75, color=color,
                   label=f"{label} (heads)")
        ax.plot(x, d.mean(1), color=color, alpha=0.5, lw=1)
        if uniform and label in uniform:
            ax.hlines(uniform[label], 0.7, depth + 0.3, colors=color, linestyles="dashed",
                      lw=0.8, alpha=0.7, label=f"{label}: uniform attention")
    ax.set_xlabel("block")
    ax.set_ylabel(f"mean attention distance\n({unit})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    top = max([float(np.max(d)) for d in distances.values()] + list((uniform or {}).values()))
    ax.set_ylim(0, 1.1 * top if top > 0 else 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the command


@dataclass
class AttentionConfig:
    """What ``repsim attention`` computes. ``weights`` is empty (defaults), one entry for all
    models, or one per model; ``ids`` overrides ``images``."""

    models: list[str]
    weights: list[str | None] = field(default_factory=list)
    dataset: str = "cifar10-probe"
    split: str = "test"
    data_root: str | None = None
    images: int = 4
    ids: list[int] | None = None
    layers: str | None = None  # blocks for the per-head maps; default first, middle, last
    probe: int = DEFAULT_PROBE  # images for the mean attention distance
    seed: int = 0
    batch_size: int = 64
    device: str | None = None
    unit: str = "image"
    renormalize: bool = True
    title: str | None = None  # of the distance plot
    out: str | None = None
    cache: bool = True
    progress: bool = True


def resolve_blocks(request: str | Sequence | None, depth: int, model=None, spec=None
                   ) -> list[int]:
    """Block indices from ``'0,5'``, ``'blocks.0,blocks.5'``, ``'blocks'``, globs; None ->
    first, middle and last block."""
    if request is None:
        return sorted({0, depth // 2, depth - 1})
    items = [request] if isinstance(request, str) else list(request)
    parts = [p.strip() for it in items for p in str(it).split(",") if p.strip()]
    out: set[int] = set()
    for part in parts:
        if re.fullmatch(r"-?\d+", part):
            i = int(part)
            if not 0 <= i < depth:
                raise UserError(f"block {i} does not exist; valid: 0..{depth - 1} (or names "
                                "like blocks.0, 'blocks' for all); fix: correct --layers")
            out.add(i)
            continue
        if model is None or spec is None:
            raise UserError(f"--layers item {part!r} is not a block number; pass e.g. 0,5")
        from repsim.models import layer_names

        names = layer_names(model, spec, part)
        idx = [int(m.group(1)) for n in names if (m := re.fullmatch(r"blocks\.(\d+)", n))]
        if not idx:
            raise UserError(f"--layers {part!r} names no transformer block (attention lives in "
                            f"blocks.0..blocks.{depth - 1}); fix: pass e.g. --layers 0,{depth - 1}")
        out.update(idx)
    return sorted(out)


def _weights_for(models: list[str], weights: list[str | None]) -> list[str | None]:
    if not weights:
        return [None] * len(models)
    if len(weights) == 1:
        return list(weights) * len(models)
    if len(weights) != len(models):
        raise UserError(f"{len(weights)} --weights for {len(models)} --model; valid: none, one "
                        "for all models, or one per --model in the same order")
    return list(weights)


def model_labels(models: list[str], weights: list[str | None]) -> list[str]:
    """Unique display labels: the model name, plus the weights' stem when needed."""
    if len(set(models)) == len(models):
        return list(models)
    out = []
    for m, w in zip(models, weights):
        out.append(m if w is None else f"{m} ({'random' if w == 'random' else Path(w).stem})")
    if len(set(out)) != len(out):
        raise UserError("the same --model and --weights are given twice; drop the duplicate")
    return out


def _cache_path(key: dict) -> Path:
    from repsim.paths import cache_dir, digest, slug

    return cache_dir("attention", f"{slug(key['model'])}-{digest(key)[:16]}.json")


def _distance_cached(model, spec, wprov: dict, probe, cfg: AttentionConfig
                     ) -> tuple[np.ndarray, bool, float]:
    """(distance (L, H) in model pixels, reused?, seconds): computed once per provenance."""
    from repsim import __version__
    from repsim.models import preprocessing_info
    from repsim.paths import write_json

    key = {"format": FORMAT, "model": spec.name, "weights": wprov, "data": probe.provenance(),
           "preprocessing": preprocessing_info(spec), "renormalize": cfg.renormalize,
           "repsim": __version__}
    path = _cache_path(key)
    if cfg.cache and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return np.asarray(saved["distance_model_px"], dtype=np.float64), True, 0.0
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: recompute and overwrite it
    t0 = time.perf_counter()
    dist = attention_distance(model, probe.images, spec, batch_size=cfg.batch_size,
                              renormalize=cfg.renormalize, progress=cfg.progress)
    seconds = time.perf_counter() - t0
    if cfg.cache:
        write_json(path, {"key": key, "distance_model_px": dist.tolist(), "seconds": seconds,
                          "torch": torch.__version__})
    return dist, False, seconds


def unit_label(unit: str, image_hw: tuple[int, int]) -> str:
    """Axis label for a distance unit; UserError for 'image' with non-square probe images."""
    h, w = image_hw
    if unit == "model":
        return "pixels of the model input"
    if unit == "fraction":
        return "fraction of the image side"
    if unit == "image":
        if h != w:
            raise UserError(f"--unit image needs square probe images, these are {h}x{w}; "
                            "fix: pass --unit model or --unit fraction")
        return f"pixels of the {h}x{w} probe image"
    raise UserError(f"--unit {unit!r}; valid: {', '.join(UNITS)}")


Saver = Callable[[Any, Path, dict], list[Path]]


def _png(fig, stem: Path, provenance: dict) -> list[Path]:
    """The command's figure writer: ``stem.png`` with provenance in its text chunk."""
    from repsim.viz import save_figure

    return [save_figure(fig, stem.with_name(stem.name + ".png"), provenance)]


def _check_vit(name: str) -> None:
    from repsim.models import get_spec

    spec = get_spec(name)
    if spec.family != "vit":
        raise UserError(
            f"{spec.name} is a {spec.family} model, and attention maps need a Vision "
            "Transformer; valid: vit_cifar, vit_imagenet or timm:<a ViT>; fix: pass a ViT, "
            f"or run `repsim featuremaps --model {spec.name}` for CNN feature maps")


def run_attention(cfg: AttentionConfig) -> dict[str, Any]:
    """Per-head class-token maps, rollout maps and mean attention distance for ``cfg.models``.

    Writes into ``cfg.out`` (default ``$REPSIM_FIGURES/attention``): ``attention_heads_<label>
    .png``, ``attention_maps_<label>.npz``, ``attention_rollout.png``, ``attention_distance
    .png/.csv/.json``. Distances are cached per (model, weights, probe set, preprocessing) in
    ``$REPSIM_CACHE/attention``. Returns a summary dict (outputs, models, seconds).
    """
    from repsim import models as zoo
    from repsim.data import load_probe_set
    from repsim.models import resolve_device
    from repsim.paths import figures_dir
    from repsim.viz import pick_images

    t0 = time.perf_counter()
    if not cfg.models:
        raise UserError("no --model given; pass e.g. --model vit_cifar --model vit_imagenet")
    weights = _weights_for(cfg.models, cfg.weights)
    labels = model_labels(cfg.models, weights)
    for name in cfg.models:
        _check_vit(name)
    device = resolve_device(cfg.device)
    probe = load_probe_set(cfg.dataset, cfg.split, n=cfg.probe, seed=cfg.seed,
                           data_root=cfg.data_root, progress=cfg.progress)
    images, ids = pick_images(probe, cfg.images, cfg.ids, cfg.data_root, cfg.progress)
    unit_label(cfg.unit, tuple(images.shape[1:3]))  # fails before the slow part
    loaded = []
    for name, w, label in zip(cfg.models, weights, labels):
        model, wprov = zoo.load_model(name, w, seed=cfg.seed, device=device)
        loaded.append((label, name, model, wprov))
    out = Path(cfg.out) if cfg.out else figures_dir("attention")
    res = attention_views(loaded, probe, images, ids, cfg, out, "attention", _png)
    res.pop("entries")  # in attention_distance.json; the summary stays short
    return {**res, "out": str(out), "seconds": time.perf_counter() - t0}


def attention_views(loaded: list[tuple[str, str, nn.Module, dict]], probe, images: np.ndarray,
                    ids: np.ndarray, cfg: AttentionConfig, out: Path, prefix: str,
                    save: Saver) -> dict[str, Any]:
    """Draw and save every view for ``loaded`` = ``[(label, model name, model, weights
    provenance)]``: ``<prefix>_heads_<label>``, ``<prefix>_rollout``, ``<prefix>_distance``
    figures (written by ``save(fig, stem, provenance)``), ``<prefix>_maps_<label>.npz`` and
    ``<prefix>_distance.csv/.json``. ``probe`` is the distance probe set, ``images``/``ids``
    the drawn images. Returns a summary (outputs, models, distances, reused flags)."""
    if cfg.unit not in UNITS:
        raise UserError(f"unit {cfg.unit!r}; valid: {', '.join(UNITS)}")
    axis = unit_label(cfg.unit, tuple(images.shape[1:3]))
    outputs: list[str] = []
    entries = []
    rollouts: dict[str, np.ndarray] = {}
    for label, name, model, wprov in loaded:
        entry, roll, files = _one_model(label, name, model, wprov, cfg, probe, images, ids,
                                        out, prefix, save)
        entries.append(entry)
        rollouts[label] = roll
        outputs += files

    base = _base_provenance(cfg, probe, ids)
    labels = [e["label"] for e in entries]
    fig = plot_rollout(images, rollouts, ids=ids)
    outputs += map(str, save(fig, out / f"{prefix}_rollout", {**base, "models": labels}))
    key = {"image": "distance_image_px", "model": "distance_model_px",
           "fraction": "distance_fraction"}[cfg.unit]
    plotted = {e["label"]: np.asarray(e[key]) for e in entries}
    uniform = {e["label"]: e["uniform_attention_distance_model_px"] * e["unit_factor"][cfg.unit]
               for e in entries}
    fig = plot_attention_distance(plotted, axis, uniform, cfg.title or "")
    outputs += map(str, save(fig, out / f"{prefix}_distance", {**base, "unit": cfg.unit}))
    outputs += _write_distance_tables(out / f"{prefix}_distance", entries, base, cfg,
                                      len(probe))
    return {"outputs": outputs, "models": labels, "n_images": len(ids), "n_probe": len(probe),
            "reused": [e["reused"] for e in entries], "unit": cfg.unit,
            "distance_mean_per_block": {lab: d.mean(1).round(4).tolist()
                                        for lab, d in plotted.items()},
            "entries": entries}


def _base_provenance(cfg: AttentionConfig, probe, ids: np.ndarray) -> dict[str, Any]:
    from repsim import __version__

    return {"data": probe.provenance(), "image_ids": ids.tolist(), "seed": cfg.seed,
            "renormalize": cfg.renormalize,
            "versions": {"repsim": __version__, "torch": torch.__version__}}


def _one_model(label: str, name: str, model: nn.Module, wprov: dict, cfg: AttentionConfig,
               probe, images: np.ndarray, ids: np.ndarray, out: Path, prefix: str,
               save: Saver) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """One model's maps (figure + npz) and distances: (entry for the tables, rollout maps
    ``(N, gh, gw)``, files written)."""
    from dataclasses import asdict

    from repsim import models as zoo
    from repsim.paths import save_npz, slug

    spec = zoo.get_spec(name)
    geo = vit_geometry(model)
    blocks = resolve_blocks(cfg.layers, geo.depth, model, spec)
    query = "cls" if geo.class_token else "mean"
    x = zoo.preprocess(spec, torch.from_numpy(images).to(model_device(model)))
    attn = attention_maps(model, x)  # (N, L, H, T, T): all blocks, rollout needs them
    heads = token_maps(attn[:, blocks], geo.grid, query)
    roll = token_maps(rollout(attn), geo.grid, query)
    del attn
    dist, reused, seconds = _distance_cached(model, spec, wprov, probe, cfg)

    s = spec.input_size
    h, w = images.shape[1:3]
    factor = {"model": 1.0, "fraction": 1.0 / s, "image": h / s if h == w else None}
    prov = {"model": name, "label": label, "weights": wprov, "geometry": asdict(geo),
            "blocks": blocks, "query": query, **_base_provenance(cfg, probe, ids),
            "preprocessing": zoo.preprocessing_info(spec)}
    npz = save_npz(out / f"{prefix}_maps_{slug(label)}.npz",
                   heads=heads.astype(np.float32), rollout=roll.astype(np.float32), ids=ids,
                   blocks=np.asarray(blocks), images=images,
                   provenance=np.asarray(json.dumps(prov, default=str)))
    kind = "class-token" if query == "cls" else "mean-query"
    fig = plot_attention_heads(images, heads, blocks, ids=ids, title=f"{label}: {kind} "
                               "attention per head (each panel min-max scaled)")
    files = save(fig, out / f"{prefix}_heads_{slug(label)}", prov)
    entry = {
        "label": label, "model": name, "weights": wprov, "geometry": asdict(geo),
        "input_size": s, "unit_factor": factor,
        "distance_model_px": dist.tolist(),
        "distance_fraction": (dist * factor["fraction"]).tolist(),
        "distance_image_px": None if factor["image"] is None
        else (dist * factor["image"]).tolist(),
        # What uniform attention would give: the grid's mean pairwise patch distance.
        "uniform_attention_distance_model_px":
            float(distance_matrix(geo.grid, geo.patch_size).mean()),
        "reused": reused, "seconds": seconds,
    }
    return entry, roll, [str(f) for f in files] + [str(npz)]


def _write_distance_tables(stem: Path, entries: list[dict], base: dict, cfg: AttentionConfig,
                           n_probe: int) -> list[str]:
    """``<stem>.csv`` (one row per model, block, head) and ``<stem>.json``."""
    from repsim.paths import write_json, write_text

    rows = ["label,model,weights,block,head,distance_image_px,distance_model_px,"
            "distance_fraction,n_images,renormalized"]
    for e in entries:
        dm = np.asarray(e["distance_model_px"])
        di = None if e["distance_image_px"] is None else np.asarray(e["distance_image_px"])
        df = np.asarray(e["distance_fraction"])
        for b, h in np.ndindex(*dm.shape):
            rows.append(",".join([
                _csv(e["label"]), _csv(e["model"]), _csv(str(e["weights"]["weights"])),
                str(b), str(h), "" if di is None else f"{di[b, h]:.6f}", f"{dm[b, h]:.6f}",
                f"{df[b, h]:.8f}", str(n_probe), str(cfg.renormalize).lower()]))
    csv = write_text(stem.with_name(stem.name + ".csv"), "\n".join(rows) + "\n")
    js = write_json(stem.with_name(stem.name + ".json"),
                    {"format": FORMAT, **base, "unit_plotted": cfg.unit, "models": entries})
    return [str(csv), str(js)]


def _csv(text: str) -> str:
    """One CSV field (RFC 4180 quoting)."""
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


# --------------------------------------------------------------------------- repsim figures


@figure_kind("attention", fields=("models", "images", "ids", "blocks", "unit", "batch_size",
                                  "renormalize"), required=("models",))
def build_attention_figure(spec: dict, ctx) -> list[Path]:
    """ViT attention per head, attention rollout and mean attention distance, side by side.

    Spec keys: ``models`` (ViTs), ``images`` (first N probe images drawn, default 4) or
    ``ids``, ``blocks`` (per-head maps; default first, middle, last), ``unit`` (image, model
    or fraction), ``batch_size``, ``renormalize``; ``[probe]`` is the distance probe set.
    Writes ``<name>_heads_<label>``, ``<name>_rollout``, ``<name>_distance`` (.png, .pdf),
    ``<name>_maps_<label>.npz`` and ``<name>_distance.csv/.json``.
    """
    from repsim import plots
    from repsim.models import resolve_device
    from repsim.viz import pick_images

    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    for r in refs:
        _check_vit(r.model)
    pspec = ctx.probe_spec(spec)
    probe = ctx.images(pspec)
    models = [ctx.model(r) for r in refs]  # a model without weights skips the figure here
    cfg = AttentionConfig(models=[r.model for r in refs], layers=spec.get("blocks"),
                          unit=spec.get("unit", "image"), seed=pspec.seed,
                          batch_size=int(spec.get("batch_size", 64)),
                          renormalize=bool(spec.get("renormalize", True)),
                          title=spec.get("title"), progress=ctx.progress)
    images, ids = pick_images(probe, spec.get("images", 4), spec.get("ids"), pspec.data_root,
                              ctx.progress)
    device = resolve_device(ctx.device)
    loaded = [(r.display(), r.model, m.to(device), prov) for r, (m, prov) in zip(refs, models)]
    try:
        res = attention_views(loaded, probe, images, ids, cfg, ctx.out_dir, ctx.name,
                              lambda fig, stem, prov: plots.save(fig, stem))
    finally:
        for _, _, m, _ in loaded:
            m.to("cpu")  # the context shares loaded models between figures
    ctx.data.update({"image_ids": ids.tolist(), "unit": cfg.unit,
                     "models": [{k: e[k] for k in ("label", "model", "geometry",
                                                   "distance_model_px", "distance_image_px",
                                                   "uniform_attention_distance_model_px")}
                                for e in res["entries"]]})
    return [Path(p) for p in res["outputs"]]
