"""The ``prefix_tokens`` figure kind: what several class tokens hold (issue 18).

Per model with several prefix tokens: the CKA among them at one block (four representations,
or one?) and the attention patch queries give each, block by block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from repsim.compare import InputUnavailable
from repsim.errors import UserError
from repsim.figures.context import weights_file


def token_cka(features: np.ndarray, n_prefix: int, estimator: str = "debiased") -> np.ndarray:
    """``(n_prefix, n_prefix)`` float64 linear CKA among the prefix tokens of a ``prefix``
    store row block ``(n, n_prefix * D)`` (token ``t`` in columns ``t*D:(t+1)*D``)."""
    from repsim.cka import cka_matrix

    tokens = np.split(np.asarray(features), n_prefix, axis=1)
    return cka_matrix(tokens, tokens, kernel="linear", estimator=estimator)


def _layer(spec: dict, model, model_spec) -> str:
    """The spec's ``layer`` (default: the last block), which must name exactly one layer."""
    from repsim.models import layer_names

    last = f"blocks.{len(model.blocks) - 1}"
    layer = spec.get("layer", last)
    names = layer_names(model, model_spec, layer, name="layer")
    if len(names) != 1:  # a glob: the figure compares the prefix tokens of one layer
        raise UserError(f"layer={layer!r} names {len(names)} layers ({names[0]} .. "
                        f"{names[-1]}); the prefix figure reads one, e.g. layer = \"{last}\"")
    return names[0]


def _measure(ref, spec: dict, ctx) -> dict:
    import torch

    from repsim.attention import prefix_attention_mass, vit_geometry
    from repsim.hooks import extract
    from repsim.models import preprocess
    from repsim.registry import get_spec

    model, prov = ctx.model(ref)
    geo = vit_geometry(model)
    n_prefix = geo.n_prefix
    if n_prefix < 2:
        raise InputUnavailable(f"{ref.model} has {n_prefix} prefix token(s); this figure "
                               "compares several")
    layer = _layer(spec, model, get_spec(ref.model))
    images = ctx.images(ctx.probe_spec(spec)).images
    x = preprocess(get_spec(ref.model), torch.from_numpy(np.ascontiguousarray(images)))
    with ctx.on_device([model]) as (m,):
        feats = extract(m, x, layers=[layer], reduce="prefix", device=ctx.device)[layer]
        mass = prefix_attention_mass(m, x)
        # Measured, not assumed: an LSA model's patch queries may not attend to themselves,
        # so uniform attention gives each prefix token 1 / (T - 1), not 1 / T.
        uniform = prefix_attention_mass(m, x[:1], uniform=True)
    final = weights_file(ref)  # the manifest names a run by its weights file
    entry = next((e for e in ((ctx.manifest() or {}).get("checkpoints") or [])
                  if final is not None and e.get("name") == final.stem), {})
    stale = ctx.stale(entry)
    if stale:  # an entry of another version of the file: its accuracy is not this one's
        ctx.log(f"{ctx.name}: {ref.display()}: {stale}; its accuracy is left out")
        entry = {}
    # Token 0 is timm's class token when it has one; the others (all, without) its register
    # tokens (class tokens in mcls4).
    tokens = [str(t) for t in range(n_prefix)]
    tokens[0] += " (cls)" if geo.class_token else ""
    return {"model": ref.model, "label": ref.display(), "layer": layer, "n": len(x),
            "weights_sha256": prov.get("weights_sha256"), "n_prefix": n_prefix,
            "tokens": tokens,
            "token_cka": token_cka(feats, n_prefix).tolist(),
            "attention_mass": mass.tolist(),
            # uniform attention over the keys the model's mask allows (1 / T without one)
            "uniform_mass": float(uniform.mean()),
            "test_accuracy": entry.get("test_accuracy")}


def build_figure(spec: dict, ctx) -> list[Path]:
    """One column per model: CKA among its prefix tokens (top), attention mass on each
    prefix token per block (bottom)."""
    from repsim.figures import draw

    if not isinstance(spec.get("layer", ""), str):  # before loading any model
        raise UserError(f"layer={spec['layer']!r} must be one layer name, e.g. layer = "
                        "\"blocks.8\"; fix the file")
    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    for r in refs:  # every model first: a missing checkpoint skips before any extraction
        ctx.model(r)
    results = [_measure(r, spec, ctx) for r in refs]
    fig, axes = draw.plt.subplots(2, len(results), figsize=(4.2 * len(results), 7.4),
                                  squeeze=False, constrained_layout=True)
    for col, res in enumerate(results):
        top, bottom = axes[:, col]
        names = res["tokens"]
        acc = res["test_accuracy"]
        head = res["label"] + ("" if acc is None else f" ({acc:.2f} %)")
        draw.draw_heatmap(top, np.array(res["token_cka"]), names, names, head, head, annotate=True)
        top.set(xlabel="prefix token", ylabel="prefix token")
        top.set_title(f"{head}\n{res['layer']}: debiased CKA among prefix tokens", fontsize=9)
        mass = np.array(res["attention_mass"])
        for t, name in enumerate(names):
            bottom.plot(range(len(mass)), mass[:, t], marker="o", label=f"token {name}")
        bottom.axhline(res["uniform_mass"], ls="--", c="grey", lw=0.8, label="uniform")
        bottom.set(xlabel="block", ylabel="attention from patch queries")
        bottom.set_title("attention on each prefix token (mean over heads)", fontsize=9)
        bottom.legend(fontsize=8)
    fig.suptitle(spec.get("title") or "Prefix tokens", fontsize=11)
    ctx.data["models"] = results
    return ctx.save(fig)
