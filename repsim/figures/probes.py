"""Figure kind ``probes``: linear-probe accuracy by depth next to the CKA best-match curves,
and what deleting each layer's top principal components does to both (:mod:`repsim.probes`).

Spec keys: ``models`` (one, or two matched in each other), ``ks`` (components to delete),
``train_fraction`` (of each class, to train the probe), ``split_seed``, ``weight_decay``,
``steps``. Probes and CKA read the same ``[probe]`` stores; ``[cka]`` must be linear.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from repsim import probes
from repsim.errors import UserError, is_whole
from repsim.figures import draw


def _options(spec: dict, ctx) -> dict:
    """The probe options of a spec, checked (a float, string or boolean is not coerced)."""
    ks = spec.get("ks", list(probes.DEFAULT_KS))
    if not (isinstance(ks, list) and all(is_whole(k, 0) for k in ks)):
        raise UserError(f"{ctx.name}: ks={ks!r} must be a list of non-negative integers, "
                        "e.g. [1, 5, 10]")
    opts = {"train_fraction": spec.get("train_fraction", 0.5), "seed": spec.get("split_seed", 0),
            "weight_decay": spec.get("weight_decay", probes.DEFAULT_WEIGHT_DECAY)}
    for key, v in opts.items():
        if isinstance(v, bool) or not isinstance(v, int if key == "seed" else (int, float)):
            raise UserError(f"{ctx.name}: {'split_seed' if key == 'seed' else key}={v!r} must "
                            f"be {'an integer' if key == 'seed' else 'a number'}; fix the file")
    return {"ks": ks, **opts, "steps": ctx.positive_int(spec, "steps", probes.DEFAULT_STEPS)}


def _features(store, layers: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``({layer: (n, p)}, labels (n,), ids (n,))`` of ``layers`` in the store."""
    from repsim.store import Store

    with Store(store.path) as s:
        return {name: s[name][:] for name in layers}, s.labels[:], s.ids[:]


def _curve(res: dict, layers: list[str]) -> dict:
    """The best-match curve of a CKA result (rows: ``layers``) with its +-1 SE."""
    best = draw.best_matches(res)
    rows = [res["layers_a"].index(name) for name in layers]
    return {"layers_b": res["layers_b"],
            "best_layer_b": [res["layers_b"][best["index"][i]] if best["index"][i] >= 0
                             else None for i in rows],
            **{k: [best[k][i] for i in rows] for k in ("value", "se")}}


def build_figure(spec: dict, ctx) -> list[Path]:
    """Per model: probe accuracy, best-match CKA and self-CKA by layer, as measured and after
    deleting each ``k`` of the top principal components; a probe on the raw pixels for
    reference. Writes ``<name>.png``, ``.pdf`` and ``.csv``."""
    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    if len(refs) not in (1, 2):
        raise UserError(f"{ctx.name}: models lists {len(refs)} models; pass one, or two to "
                        "match each one's layers in the other")
    probe, c, opts = ctx.probe_spec(spec), ctx.cka_settings(spec), _options(spec, ctx)
    if c["kernel"] != "linear":
        raise UserError(f"{ctx.name}: kernel={c['kernel']!r}; the probes figure compares "
                        "principal-component deletions with linear CKA: use kernel='linear'")
    for r in refs:  # a missing model skips before any work
        ctx.store(r, probe)
    feats = [_features(*ctx.layer_store(r, probe)) for r in refs]
    images = ctx.images(probe)
    if any(not np.array_equal(ids, images.ids) for _, _, ids in feats):
        raise UserError(f"{ctx.name}: the stores' images are not the probe set's; rerun with "
                        "--force to re-extract them")
    labels = feats[0][1]
    train, test = probes.stratified_split(labels, opts["train_fraction"], opts["seed"])
    pixels = images.images.reshape(len(labels), -1).astype(np.float32) / 255
    pixel_acc = probes.linear_probe(pixels[train], labels[train], pixels[test], labels[test],
                                    weight_decay=opts["weight_decay"], steps=opts["steps"],
                                    device=ctx.device)
    entries = []
    for i, ref in enumerate(refs):
        other = feats[1 - i][0] if len(refs) == 2 else None
        res = probes.probe_layers(feats[i][0], labels, reference=other,
                                  estimator=c["estimator"], batch_size=c["batch_size"],
                                  batch_seed=c["batch_seed"], device=ctx.device, **opts)
        entry = {"label": ref.display(), **res.to_dict()}
        if other is not None:
            entry.update(other=refs[1 - i].display(),
                         curve=_curve(ctx.cka(ref, refs[1 - i], probe, c), res.layers))
        entries.append(entry)
    title = (draw.spec_title(spec, "Linear probes by depth", c, len(labels))
             + f"; probe: {len(train)} train / {len(test)} test images, weight decay "
             f"{opts['weight_decay']:g}")
    ctx.data.update({"n": len(labels), "cka": c, "probe": opts, "pixel_accuracy": pixel_acc,
                     "entries": entries})
    csv_text = draw.csv_text(_rows(entries), ["model", "layer", "k", "accuracy", "self_cka",
                                               "match_layer", "match_cka"])
    return (ctx.save(draw_probes(entries, pixel_acc, len(np.unique(labels)), title))
            + [ctx.write_text(".csv", csv_text)])


def _rows(entries: list[dict]) -> list[dict]:
    """One CSV row per model, layer and number of deleted components."""
    return [{"model": e["label"], "layer": layer, "k": k, "accuracy": e["accuracy"][i][j],
             "self_cka": e["self_cka"][i][j],
             "match_layer": e["match_layers"][i] if e["match_layers"] else None,
             "match_cka": e["match_cka"][i][j] if e["match_cka"] else None}
            for e in entries for i, layer in enumerate(e["layers"]) for j, k in enumerate(e["ks"])]


def _series(ax, x, values, ks, deleted_only: bool = False) -> None:
    """One line per column of ``values`` (rows: layers; columns: ``ks``): k = 0 (the layer
    as it is) in black, deletions light to dark."""
    shades = plt.cm.viridis(np.linspace(0.85, 0.25, max(1, len(ks) - 1)))
    for j, k in enumerate(ks):
        if k == 0 and deleted_only:
            continue
        ax.plot(x, np.array([r[j] for r in values], float), marker="o", ms=3,
                lw=2 if k == 0 else 1, ls="-" if k == 0 else "--",
                color="black" if k == 0 else shades[j - 1],
                label="as measured" if k == 0 else f"top {k} PC{'s' * (k > 1)} deleted")


def _cka_axis(ax) -> None:
    """At least -0.05..1.05, and wider to hold every value: CKA is not clamped."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(-0.05, lo), max(1.05, hi))


def draw_probes(entries: list[dict], pixel_acc: float, n_classes: int,
                title: str) -> plt.Figure:
    """One column per model: probe accuracy by layer (top), CKA with the best-matching layer
    of the other model (middle; the measured curve with +-1 SE), and CKA of each layer with
    itself (bottom), each as measured (black) and after deleting the top k components."""
    rows = 3 if any("curve" in e for e in entries) else 2
    fig, axes = plt.subplots(rows, len(entries), figsize=(4.8 * len(entries), 2.7 * rows + 1),
                             layout="constrained", squeeze=False, sharex="col")
    for col, e in zip(axes.T, entries):
        x, ks = np.arange(len(e["layers"])), e["ks"]
        ax = col[0]
        _series(ax, x, e["accuracy"], ks)
        ax.axhline(pixel_acc, color="0.5", ls=":", lw=1,
                   label=f"probe on the pixels ({pixel_acc:.2f})")
        ax.axhline(1 / n_classes, color="0.75", lw=1, label="chance")
        ax.set_ylim(0, 1)
        ax.set_ylabel("probe test accuracy")
        ax.set_title(e["label"], fontsize=10)
        if "curve" in e:
            ax = col[1]
            _series(ax, x, e["match_cka"], ks, deleted_only=True)  # k = 0: the curve
            val = np.array(e["curve"]["value"], float)
            ax.errorbar(x, val, yerr=np.array(e["curve"]["se"], float), marker="o", ms=3,
                        lw=2, color="black", capsize=2)
            for xi, yi, name in zip(x, val, e["curve"]["best_layer_b"]):
                ax.annotate(name or "", (xi, yi), fontsize=6, xytext=(0, 4),
                            textcoords="offset points", ha="center")
            _cka_axis(ax)
            ax.set_ylabel(f"CKA with best match\nin {e['other']} (+-1 SE)")
        ax = col[-1]
        _series(ax, x, e["self_cka"], ks, deleted_only=True)  # k = 0: 1 exactly
        _cka_axis(ax)
        ax.set_ylabel("CKA with itself\nafter the deletion")
        ax.set_xticks(x, labels=e["layers"], rotation=90, fontsize=7)
        ax.set_xlabel(f"{e['label']}: layer")
        for a in col:
            a.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center",
               ncol=len(entries[0]["ks"]) + 2, fontsize=8)
    fig.suptitle(title, fontsize=11, wrap=True)
    return fig
