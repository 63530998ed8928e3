"""Figure kind ``dynamics``: which layers settle first during training.

For each model of the spec, one training run: its final checkpoint (the model's own weights,
or ``weights``) and the snapshots that run kept (``repsim train --snapshots``, listed under
``snapshots`` in the checkpoint's manifest entry; :mod:`repsim.checkpoints`). For every
snapshot epoch ``e`` and layer ``l``: CKA(layer ``l`` at epoch ``e``, layer ``l`` of the final
model) on the probe set, next to the snapshot's test accuracy. A layer is *settled* from the
first snapshot epoch after which its CKA to the final model stays at or above ``settle``
(default 0.9). A model without snapshots is named, with the command that makes them, in the
figure and its data; when no model has any, the figure is skipped in one line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from repsim.compare import InputUnavailable
from repsim.errors import UserError
from repsim.figures import draw
from repsim.figures.context import ModelRef, weights_file

SETTLE = 0.9
STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)  # suggested snapshot epochs (roughly log)


def suggested_epochs(epochs: int) -> str:
    """``--snapshots`` for a run of ``epochs``: the start, roughly log-spaced epochs (layers
    change fastest early) and the last, e.g. ``0,1,2,5,10,20,50,80`` for 80."""
    return ",".join(str(e) for e in (0, *(k for k in STEPS if k < epochs), epochs))


def settled_epoch(epochs: list[int], values: list[float], level: float) -> int | None:
    """The first of ``epochs`` from which ``values`` (CKA at each) stay >= ``level`` at every
    later one; None when the last is below ``level`` (or NaN)."""
    settled = None
    for e, v in zip(epochs, values):
        if v is not None and v >= level:  # NaN compares False: not settled
            settled = e if settled is None else settled
        else:
            settled = None
    return settled


def _command(ref: ModelRef, final: Path | None, entry: dict) -> str:
    """The ``repsim train`` line that retrains ``ref``'s run keeping snapshots."""
    epochs = int(entry.get("epochs_planned") or entry.get("epochs") or 0)
    parts = [f"repsim train --model {ref.model}"]
    if entry.get("recipe"):
        parts.append(f"--recipe {entry['recipe']}")
    if epochs:
        parts.append(f"--epochs {epochs}")
    if entry.get("train_fraction", 1.0) != 1.0:
        parts.append(f"--train-fraction {entry['train_fraction']:g}")
    if final is not None:
        parts.append(f"--out {final}")
    parts.append(f"--snapshots {suggested_epochs(epochs) if epochs else '0,1,2,5,every:10'}")
    return " ".join(parts)


def _runs(refs: list[ModelRef], ctx) -> tuple[list[tuple], list[dict]]:
    """``([(ref, manifest entry, snapshots present)], [missing: model, checkpoint, command])``."""
    entries = {str(e.get("name")): e for e in (ctx.manifest() or {}).get("checkpoints", [])}
    folder = ctx.manifest_path.parent
    runs, missing = [], []
    for ref in refs:
        final = weights_file(ref)
        entry = entries.get(final.stem, {}) if final is not None else {}
        snaps = [s for s in entry.get("snapshots") or [] if (folder / s["file"]).is_file()]
        if final is not None and final.is_file() and snaps:
            runs.append((ref, entry, snaps))
        else:
            missing.append({"model": ref.display(), "checkpoint": final and final.name,
                            "command": _command(ref, final, entry)})
    return runs, missing


def _snapshot_ref(ref: ModelRef, snap: dict) -> ModelRef:
    return replace(ref, weights=snap["file"], label=f"{ref.display()} epoch {snap['epoch']}")


def _curves(ref: ModelRef, entry: dict, snaps: list[dict], ctx, probe, c, level: float
            ) -> dict:
    """One model's data: per layer, CKA to the final model (and its SE) at each snapshot."""
    cka, se, layers, n = {}, {}, None, None
    for s in snaps:
        r = ctx.cka(_snapshot_ref(ref, s), ref, probe, c)
        n, layers = r["n"], [name for name in r["layers_a"] if name in r["layers_b"]]
        for name in layers:
            i, j = r["layers_a"].index(name), r["layers_b"].index(name)
            cka.setdefault(name, []).append(r["matrix"][i][j])
            se.setdefault(name, []).append(r["se"][i][j] if r.get("se") else None)
    epochs = [int(s["epoch"]) for s in snaps]
    return {"label": ref.display(), "checkpoint": entry.get("name"), "n": n,
            "final_epoch": entry.get("epochs"), "final_test_accuracy": entry.get("test_accuracy"),
            "epochs": epochs, "layers": layers, "cka": cka, "se": se,
            "settled_epoch": {k: settled_epoch(epochs, v, level) for k, v in cka.items()},
            **{k: [s.get(k) for s in snaps] for k in ("test_accuracy", "train_accuracy")}}


def build(spec: dict, ctx) -> list[Path]:
    """Per model: CKA of each layer to the final model across the run's snapshot epochs."""
    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    level = float(spec.get("settle", SETTLE))
    if not isinstance(spec["models"], list) or not spec["models"]:
        raise UserError(f"{ctx.name}: models must be a non-empty list, got {spec['models']!r}")
    runs, missing = _runs([ctx.model_ref(m, spec) for m in spec["models"]], ctx)
    if not runs:
        raise InputUnavailable(
            "no training snapshots of " + " or ".join(m["model"] for m in missing)
            + f" in {ctx.manifest_path.parent}; make each in one run: "
            + "; ".join(f"`{m['command']}`" for m in missing))
    for m in missing:
        ctx.log(f"{ctx.name}: no snapshots of {m['model']}; make them with `{m['command']}`")
    for ref, _, snaps in runs:  # every store first: a missing file skips before any CKA
        for s in snaps:
            ctx.store(_snapshot_ref(ref, s), probe)
        ctx.store(ref, probe)
    models = [_curves(ref, entry, snaps, ctx, probe, c, level) for ref, entry, snaps in runs]
    title = spec.get("title") or "Training dynamics: CKA of each layer to the final model"
    title += "\n" + draw.describe(c["kernel"], c["estimator"], models[0]["n"], c["batch_size"])
    if missing:
        title += "\nno snapshots of " + ", ".join(m["model"] for m in missing)
    ctx.data.update(models=models, missing=missing, settle=level)
    return ctx.save(draw.dynamics(models, title, level))
