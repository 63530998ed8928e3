"""Pictures of ViT attention (measured by :mod:`repsim.attention`): the ``repsim attention``
command and the figure kind ``attention``."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repsim import __version__, paths
from repsim.assets import DEFAULT_DATASET
from repsim.attention import (
    attention_distance,
    attention_maps,
    model_device,
    rollout,
    token_maps,
    vit_geometry,
)
from repsim.errors import UserError
from repsim.figures import draw
from repsim.figures.context import check_weights
from repsim.weights import check_weights_seeds

FORMAT = "repsim-attention-distance/1"
UNITS = {"image": "distance_image_px", "model": "distance_model_px",
         "fraction": "distance_fraction"}  # unit -> the entry key holding it

Saver = Callable[[Any, Path, dict], list[Path]]  # (figure, stem, provenance) -> files


@dataclass
class AttentionConfig:
    """What ``repsim attention`` computes. ``weights`` is empty (defaults), one entry for all
    models, or one per model; ``ids`` overrides ``images``."""

    models: list[str]
    weights: list[str | None] = field(default_factory=list)
    dataset: str = DEFAULT_DATASET
    split: str = "test"
    data_root: str | None = None
    images: int = 4
    ids: list[int] | None = None
    layers: str | None = None  # blocks for the per-head maps; default first, middle, last
    probe: int = 1000  # images for the mean attention distance
    seed: int = 0  # of the probe subset
    weights_seed: int = 0  # of random weights
    batch_size: int = 64
    device: str | None = None
    unit: str = "image"
    renormalize: bool = True
    title: str | None = None  # of the distance plot
    out: str | None = None
    cache: bool = True
    progress: bool = True


def resolve_blocks(request: str | Sequence | None, depth: int, model=None, spec=None,
                   name: str = "layers") -> list[int]:
    """Block indices from ``'0,5'``, ``'blocks.0,blocks.5'``, ``'blocks'``, globs; None ->
    first, middle and last block. ``name``: the parameter that gave ``request``, named in
    errors."""
    if request is None:
        return sorted({0, depth // 2, depth - 1})
    items = [request] if isinstance(request, str) else list(request)
    out: set[int] = set()
    for part in (p.strip() for it in items for p in str(it).split(",") if p.strip()):
        if re.fullmatch(r"-?\d+", part):
            if not 0 <= int(part) < depth:
                raise UserError(f"{name}={part!r}: block {part} does not exist; valid: "
                                f"0..{depth - 1}, names like blocks.0, or 'blocks' for all")
            out.add(int(part))
            continue
        if model is None or spec is None:
            raise UserError(f"{name}={part!r} is not a block number; pass e.g. {name}='0,5'")
        from repsim.models import layer_names

        idx = [int(m.group(1)) for n in layer_names(model, spec, part, name)
               if (m := re.fullmatch(r"blocks\.(\d+)", n))]
        if not idx:
            raise UserError(f"{name}={part!r} names no transformer block (attention lives in "
                            f"blocks.0..blocks.{depth - 1}); pass e.g. {name}='0,{depth - 1}'")
        out.update(idx)
    if not out:  # else the per-head figure fails after the slow distance pass
        raise UserError(f"{name}={request!r} names no block; pass e.g. {name}='0,5', "
                        f"or 'blocks' for all {depth}")
    return sorted(out)


def model_labels(models: list[str], weights: list[str | None], seed: int = 0) -> list[str]:
    """Unique display labels: the model name, plus the weights' tag when needed."""
    if len(set(models)) == len(models):
        return list(models)
    out = [m if w is None else f"{m} ({paths.weights_tag(w, seed)})"
           for m, w in zip(models, weights)]
    if len(set(out)) != len(out):
        raise UserError("the same model and weights are given twice; drop the duplicate")
    return out


def _distance(model, spec, wprov: dict, probe, cfg: AttentionConfig
              ) -> tuple[np.ndarray, bool, float]:
    """(distance (L, H) in model pixels, reused?, seconds), cached in
    ``$REPSIM_CACHE/attention`` by content: the weights' sha256, never their path."""
    from repsim.registry import canonical_name, preprocessing_info

    weights = wprov["weights_sha256"] or wprov["weights"]  # a file's hash, or random / a tag
    # The geometry is the model's (patch size in input pixels): a fix to how it is read, or
    # a user's edited architecture (in its canonical name), must not reuse old distances.
    geometry = json.loads(json.dumps(asdict(vit_geometry(model))))
    key = {"format": FORMAT, "model": canonical_name(spec.name), "geometry": geometry,
           "weights": weights, "seed": wprov.get("seed"),
           "data": probe.provenance(), "preprocessing": preprocessing_info(spec),
           "renormalize": cfg.renormalize, "repsim": __version__}
    path = paths.cache_dir("attention", f"{paths.slug(spec.name)}-{paths.digest(key)[:16]}.json")
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
    # Written even when the cache was not read: a recomputation refreshes a stale entry.
    paths.write_json(path, {"key": key, "distance_model_px": dist.tolist(),
                            "seconds": seconds, "torch": torch.__version__})
    return dist, False, seconds


def unit_label(unit: str, image_hw: tuple[int, int]) -> str:
    """Axis label for a distance unit; UserError for 'image' with non-square probe images."""
    h, w = image_hw
    if not isinstance(unit, str) or unit not in UNITS:  # a list would raise TypeError
        raise UserError(f"unit={unit!r} is unknown; valid: {', '.join(UNITS)}")
    if unit == "image" and h != w:
        raise UserError(f"unit='image' needs square probe images, these are {h}x{w}; pass "
                        "unit='model' or unit='fraction'")
    return {"model": "pixels of the model input", "fraction": "fraction of the image side",
            "image": f"pixels of the {h}x{w} probe image"}[unit]


def check_vit(name: str) -> None:
    from repsim.registry import get_spec, list_models

    spec = get_spec(name)
    if spec.family != "vit":
        vits = [m for m in list_models() if get_spec(m).family == "vit"]
        what = "not registered as a ViT" if spec.family == "other" else f"a {spec.family} model"
        raise UserError(
            f"{spec.name} is {what}, and attention maps need a Vision Transformer; valid: "
            f"{', '.join(vits)} or timm:<a ViT>; fix: pass a ViT (register your own with "
            f"family='vit'), or draw {spec.name}'s feature maps with `repsim featuremaps`")


def run_attention(cfg: AttentionConfig) -> dict[str, Any]:
    """Every view of :func:`attention_views` for ``cfg.models``, as PNG files in ``cfg.out``
    (default ``$REPSIM_FIGURES/attention``); returns a summary dict (outputs, models, ...)."""
    from repsim import models as zoo
    from repsim.data import load_probe_set, pick_images

    t0 = time.perf_counter()
    if not cfg.models:
        raise UserError("no models given; pass e.g. models=['vit_cifar', 'vit_imagenet']")
    weights = cfg.weights or [None]
    if len(weights) == 1:
        weights = weights * len(cfg.models)
    if len(weights) != len(cfg.models):
        raise UserError(f"{len(weights)} weights for {len(cfg.models)} models (weights="
                        f"{cfg.weights!r}); valid: none, one for all models, or one per model "
                        "in the same order")
    check_weights_seeds({"weights": weights, "weights_seed": cfg.weights_seed})
    labels = model_labels(cfg.models, weights, cfg.weights_seed)
    for name in cfg.models:
        check_vit(name)
    device = zoo.resolve_device(cfg.device)
    probe = load_probe_set(cfg.dataset, cfg.split, n=cfg.probe, seed=cfg.seed,
                           data_root=cfg.data_root, progress=cfg.progress)
    images, ids = pick_images(probe, cfg.images, cfg.ids, cfg.data_root, cfg.progress)
    unit_label(cfg.unit, tuple(images.shape[1:3]))  # fails before the slow part
    loaded = [(label, name, *zoo.load_model(name, w, seed=cfg.weights_seed, device=device))
              for name, w, label in zip(cfg.models, weights, labels)]
    out = Path(cfg.out) if cfg.out else paths.figures_dir("attention")
    res = attention_views(loaded, probe, images, ids, cfg, out, "attention",
                          lambda fig, stem, prov: draw.save(fig, stem, prov, ("png",)))
    res.pop("entries")  # in attention_distance.json; the summary stays short
    return {**res, "out": str(out), "seconds": time.perf_counter() - t0}


def attention_views(loaded: list[tuple], probe, images: np.ndarray, ids: np.ndarray,
                    cfg: AttentionConfig, out: Path, prefix: str, save: Saver) -> dict[str, Any]:
    """Per-head maps, rollout and mean attention distance of ``loaded`` = ``[(label, model
    name, model, weights provenance)]``: figures ``<prefix>_heads_<label>``, ``_rollout``,
    ``_distance`` (through ``save``), ``<prefix>_maps_<label>.npz``, ``_distance.csv/.json``.
    The distance is over ``probe``; the maps over ``images``. Returns a summary dict."""
    axis = unit_label(cfg.unit, tuple(images.shape[1:3]))
    outputs: list[str] = []
    entries, rollouts = [], {}
    for label, name, model, wprov in loaded:
        entry, rollouts[label], files = _one_model(label, name, model, wprov, cfg, probe,
                                                   images, ids, out / prefix, save)
        entries.append(entry)
        outputs += files
    labels = [e["label"] for e in entries]
    base = {**_base_provenance(cfg, probe, ids),  # the models drawn, for the shared plots
            "models": [{k: e[k] for k in ("label", "model", "weights")} for e in entries]}
    fig = draw.attention_rollout(images, rollouts, ids=ids)
    outputs += map(str, save(fig, out / f"{prefix}_rollout", base))
    plotted = {e["label"]: np.asarray(e[UNITS[cfg.unit]]) for e in entries}
    uniform = {e["label"]: e["uniform_attention_distance_model_px"] * e["unit_factor"][cfg.unit]
               for e in entries}
    fig = draw.attention_distance(plotted, axis, uniform, cfg.title or "")
    outputs += map(str, save(fig, out / f"{prefix}_distance", {**base, "unit": cfg.unit}))
    outputs += _write_tables(out / f"{prefix}_distance", entries, base, cfg, len(probe))
    return {"outputs": outputs, "models": labels, "n_images": len(ids), "n_probe": len(probe),
            "reused": [e["reused"] for e in entries], "unit": cfg.unit,
            "distance_mean_per_block": {lab: d.mean(1).round(4).tolist()
                                        for lab, d in plotted.items()},
            "entries": entries}


def _base_provenance(cfg: AttentionConfig, probe, ids: np.ndarray) -> dict[str, Any]:
    return {"data": probe.provenance(), "image_ids": ids.tolist(), "seed": cfg.seed,
            "renormalize": cfg.renormalize,
            "versions": {"repsim": __version__, "torch": torch.__version__}}


def _one_model(label: str, name: str, model, wprov: dict, cfg: AttentionConfig, probe,
               images: np.ndarray, ids: np.ndarray, stem: Path, save: Saver
               ) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """One model's maps (figure ``<stem>_heads_<label>`` + npz) and distances: (entry for the
    tables, rollout maps ``(N, gh, gw)``, files written)."""
    from repsim import models as zoo
    from repsim.registry import get_spec, preprocessing_info

    spec = get_spec(name)
    geo = vit_geometry(model)
    blocks = resolve_blocks(cfg.layers, geo.depth, model, spec)
    query = "cls" if geo.class_token else "mean"
    x = zoo.preprocess(spec, torch.from_numpy(images).to(model_device(model)))
    attn = attention_maps(model, x)  # (N, L, H, T, T): all blocks, rollout needs them
    heads = token_maps(attn[:, blocks], geo.grid, query)
    roll = token_maps(rollout(attn), geo.grid, query)
    del attn
    dist, reused, seconds = _distance(model, spec, wprov, probe, cfg)
    s, (h, w) = spec.input_size, images.shape[1:3]
    factor = {"model": 1.0, "fraction": 1.0 / s, "image": h / s if h == w else None}
    prov = {"model": name, "label": label, "weights": wprov, "geometry": asdict(geo),
            "blocks": blocks, "query": query, **_base_provenance(cfg, probe, ids),
            "preprocessing": preprocessing_info(spec)}
    tag = paths.slug(label)
    npz = paths.save_npz(stem.with_name(f"{stem.name}_maps_{tag}.npz"),
                         heads=heads.astype(np.float32), rollout=roll.astype(np.float32),
                         ids=ids, blocks=np.asarray(blocks), images=images,
                         provenance=np.asarray(json.dumps(prov, default=str)))
    kind = "class-token" if query == "cls" else "mean-query"
    fig = draw.attention_heads(images, heads, blocks, ids=ids, title=f"{label}: {kind} "
                               "attention per head (each panel min-max scaled)")
    files = save(fig, stem.with_name(f"{stem.name}_heads_{tag}"), prov)
    entry = {
        "label": label, "model": name, "weights": wprov, "geometry": asdict(geo),
        "blocks": blocks, "input_size": s, "unit_factor": factor,
        **{UNITS[u]: None if factor[u] is None else (dist * factor[u]).tolist()
           for u in ("model", "fraction", "image")},
        # What uniform attention would give under the model's own mask: the grid's mean
        # pairwise patch distance, unless LSA masks self-pairs or prefix mass counts as 0.
        "uniform_attention_distance_model_px": float(attention_distance(
            model, x[:1], renormalize=cfg.renormalize, uniform=True).mean()),
        "reused": reused, "seconds": seconds,
    }
    return entry, roll, [str(f) for f in files] + [str(npz)]


def _write_tables(stem: Path, entries: list[dict], base: dict, cfg: AttentionConfig,
                  n_probe: int) -> list[str]:
    """``<stem>.csv`` (one row per model, block, head) and ``<stem>.json``."""
    columns = ["label", "model", "weights", "block", "head", "distance_image_px",
               "distance_model_px", "distance_fraction", "n_images", "renormalized"]
    rows = []
    for e in entries:
        dm, df = np.asarray(e["distance_model_px"]), np.asarray(e["distance_fraction"])
        di = None if e["distance_image_px"] is None else np.asarray(e["distance_image_px"])
        rows += [dict(zip(columns, [e["label"], e["model"], str(e["weights"]["weights"]), b, h,
                                    None if di is None else f"{di[b, h]:.6f}", f"{dm[b, h]:.6f}",
                                    f"{df[b, h]:.8f}", n_probe, str(cfg.renormalize).lower()]))
                 for b, h in np.ndindex(*dm.shape)]
    return [str(paths.write_text(stem.with_name(stem.name + ".csv"), draw.csv_text(rows, columns))),
            str(paths.write_json(stem.with_name(stem.name + ".json"), {
                "format": FORMAT, **base, "unit_plotted": cfg.unit, "models": entries}))]


def build_figure(spec: dict, ctx) -> list[Path]:
    """Figure kind ``attention``: :func:`attention_views` of the spec's ``models`` (ViTs) on
    its ``images`` (default 4) or ``ids``, per-head maps of ``blocks``; ``[probe]`` is the
    distance probe set."""
    from repsim.registry import get_spec

    renormalize = spec.get("renormalize", True)
    if not isinstance(renormalize, bool):  # bool("false") is True
        raise UserError(f"{ctx.name}: renormalize={renormalize!r} must be true or false; fix "
                        "the file")
    batch_size = ctx.positive_int(spec, "batch_size", 64)
    blocks = ctx.names(spec, "blocks", "block numbers or names", '"0,5"', numbers=True)
    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    for r in refs:  # every model's weights first: loading one for a skipped figure is waste
        check_vit(r.model)
        check_weights(r)
    models = [ctx.model(r) for r in refs]
    for r, (m, _) in zip(refs, models):  # before the slow part, naming the spec's key
        resolve_blocks(blocks, vit_geometry(m).depth, m, get_spec(r.model), "blocks")
    probe, images, ids = ctx.drawn_images(spec)
    cfg = AttentionConfig(models=[r.model for r in refs], layers=blocks,
                          unit=spec.get("unit", "image"), seed=ctx.probe_spec(spec).seed,
                          batch_size=batch_size, renormalize=renormalize,
                          title=spec.get("title"), cache=not ctx.force, progress=ctx.progress)
    with ctx.on_device([m for m, _ in models]) as on:
        res = attention_views([(r.display(), r.model, m, prov) for r, m, (_, prov)
                               in zip(refs, on, models)], probe, images, ids, cfg, ctx.out_dir,
                              ctx.name, lambda fig, stem, prov: draw.save(fig, stem))
    ctx.data.update({"image_ids": ids.tolist(), "unit": cfg.unit,
                     "models": [{k: e[k] for k in ("label", "model", "weights", "blocks",
                                                   "geometry", "distance_model_px",
                                                   "distance_image_px",
                                                   "uniform_attention_distance_model_px")}
                                for e in res["entries"]]})
    return [Path(p) for p in res["outputs"]]
