"""The ``projection_rank`` figure kind: how much of its width a ViT's queries and keys use.

Per block, the effective rank (Roy & Vetterli 2007) of the query and key projection matrices
and of their activations over the probe images, all tokens pooled (issue 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from repsim.errors import UserError

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn
    from matplotlib.figure import Figure


def effective_rank(singular_values: np.ndarray) -> float:
    """``exp(-sum p log p)`` with ``p = s / sum(s)`` over the non-zero singular values ``s``;
    ``k`` equal non-zero values give exactly ``k``; none (a zero matrix) gives 0."""
    s = np.asarray(singular_values, dtype=np.float64)
    if not (s > 0).any():  # else exp(entropy of nothing) = 1, one direction
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def matrix_effective_rank(m) -> float:
    """Effective rank of a matrix from its float64 singular values."""
    import torch

    return effective_rank(torch.linalg.svdvals(torch.as_tensor(m).detach().double()).numpy())


def _activation_ranks(model, x, batch_size: int = 100) -> np.ndarray:
    """``(L, 2)`` effective ranks of the query and key activations, all tokens pooled."""
    import torch

    from repsim.hooks import capture, eval_mode

    layers = [f"blocks.{i}.attn.qkv" for i in range(len(model.blocks))]
    d = model.embed_dim
    sums = torch.zeros(len(layers), 2, d, dtype=torch.float64)
    grams = torch.zeros(len(layers), 2, d, d, dtype=torch.float64)
    rows = 0
    # eval_mode: measured as it predicts, whatever mode a user's model comes in (dropout off)
    with torch.inference_mode(), eval_mode(model), capture(model, layers, reduce=None) as cap:
        for s in range(0, len(x), batch_size):
            batch = x[s:s + batch_size]
            model(batch.to(next(model.parameters()).device))
            outputs = cap.collect(len(batch))  # each qkv ran once, samples first
            for i, name in enumerate(layers):
                out = outputs[name].reshape(-1, 3 * d).double().cpu()
                for j in range(2):  # 0: queries, 1: keys
                    z = out[:, j * d:(j + 1) * d]
                    sums[i, j] += z.sum(0)
                    grams[i, j] += z.T @ z
            rows += out.shape[0]
    cov = grams - sums[..., :, None] * sums[..., None, :] / rows
    eig = torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().numpy()  # singular values
    return np.array([[effective_rank(s) for s in pair] for pair in eig])  # (L, 2)


def _measure(ref, spec: dict, ctx) -> dict:
    import torch

    from repsim.models import preprocess
    from repsim.registry import get_spec
    from repsim.tinyvit import query_key_weights

    model, prov = ctx.model(ref)
    weights = np.array([[matrix_effective_rank(w) for w in query_key_weights(blk.attn)]
                        for blk in model.blocks])
    images = ctx.images(ctx.probe_spec(spec)).images
    x = preprocess(get_spec(ref.model), torch.from_numpy(np.ascontiguousarray(images)))
    with ctx.on_device([model]) as (m,):
        acts = _activation_ranks(m, x)
    return {"model": ref.model, "label": ref.display(), "n": len(x),
            "weights_sha256": prov.get("weights_sha256"), "width": model.embed_dim,
            # a factored projection's rank (repsim.tinyvit.LowRankQKV); None: full rank
            "rank": getattr(model.blocks[0].attn.qkv, "rank", None),
            "weight_rank": weights.tolist(), "activation_rank": acts.tolist()}


def draw_ranks(results: list[dict], title: str) -> Figure:
    """Two panels (projection matrices, activations): effective rank per block, queries
    solid and keys dashed, one colour per model; dotted, each low-rank model's ``rank``."""
    from repsim.figures import draw

    fig, axes = draw.plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for k, res in enumerate(results):
        colour = f"C{k}"
        for ax, key in zip(axes, ("weight_rank", "activation_rank")):
            r = np.array(res[key])
            ax.plot(r[:, 0], "-o", c=colour, label=f"{res['label']}: queries")
            ax.plot(r[:, 1], "--s", c=colour, label=f"{res['label']}: keys")
    ranks = sorted({r["rank"] for r in results if r.get("rank") is not None})
    dotted = f" (dotted: rank {', '.join(map(str, ranks))})" if ranks else ""
    for ax, what in zip(axes, ("projection matrices", f"activations (n = {results[0]['n']:,})")):
        ax.set(xlabel="block", ylabel="effective rank", title=what + dotted)
        for rank in ranks:  # the low-rank models' own rank, the most their factor can use
            ax.axhline(rank, c="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def build_figure(spec: dict, ctx) -> list[Path]:
    """Effective rank of each model's queries and keys, per block (:func:`draw_ranks`)."""
    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    for r in refs:  # every model first: a missing checkpoint skips before any computing
        model = ctx.model(r)[0]
        blocks = getattr(model, "blocks", None)
        if not blocks or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
            raise UserError(f"{ctx.name}: {r.display()} is a {type(model).__name__}; "
                            "projection_rank reads the queries and keys of a Vision "
                            "Transformer's blocks (blocks[i].attn.qkv); list ViT models only")
    results = [_measure(r, spec, ctx) for r in refs]
    ctx.data["models"] = results
    return ctx.save(draw_ranks(results, spec.get("title")
                               or "Effective rank of queries and keys"))
