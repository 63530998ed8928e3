"""Figure kind ``dynamics``: which layers settle first during training.

Per model, the snapshots its training run kept (``repsim train --snapshots``, listed in its
manifest entry): CKA of each layer at each snapshot epoch with the same layer of the final
model. A layer is *settled* from the first epoch after which that CKA stays >= ``settle``. A
model without snapshots is named with the command that makes them.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from repsim.compare import InputUnavailable
from repsim.errors import UserError
from repsim.figures import draw
from repsim.figures.context import ModelRef, same_layer_cka, weights_file

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


def _number(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _command(ref: ModelRef, final: Path | None, entry: dict) -> str:
    """The ``repsim train`` line that retrains ``ref``'s run keeping snapshots."""
    epochs = int(entry.get("epochs_planned") or entry.get("epochs") or 0)
    fraction = entry.get("train_fraction", 1.0)
    # null (older manifests), a bool or a string is no fraction to repeat: the flag goes
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        fraction = 1.0
    parts = [f"repsim train --model {shlex.quote(ref.model)}",
             entry.get("recipe") and f"--recipe {entry['recipe']}",
             epochs and f"--epochs {epochs}",
             fraction != 1.0 and f"--train-fraction {fraction:g}",
             # as the run had them (manifests before these were recorded: the defaults);
             # :g only for floats: it writes an integer from 10**6 up as 1e+06
             *(f"--{k.replace('_', '-')} {_number(entry[k])}" for k in
               ("seed", "batch_size", "lr", "weights_seed") if entry.get(k) is not None),
             # quoted: a checkpoint folder with a space would split in the pasted line
             final is not None and f"--out {shlex.quote(str(final))}",
             f"--snapshots {suggested_epochs(epochs) if epochs else '0,1,2,5,every:10'}"]
    return " ".join(p for p in parts if p)  # the options that apply


def _runs(refs: list[ModelRef], ctx) -> tuple[list[tuple], list[dict]]:
    """``([(ref, manifest entry, snapshots present)], [missing: model, checkpoint, command])``."""
    entries = {str(e.get("name")): e for e in (ctx.manifest() or {}).get("checkpoints", [])}
    folder = ctx.manifest_path.parent
    runs, missing = [], []
    for ref in refs:
        final = weights_file(ref)
        entry = entries.get(final.stem, {}) if final is not None else {}
        snaps = [s for s in entry.get("snapshots") or [] if (folder / s["file"]).is_file()]
        # An entry of other bytes than the final file lists another run's snapshots.
        stale = ctx.stale(entry) if final is not None and final.is_file() and snaps else None
        if final is not None and final.is_file() and snaps and not stale:
            runs.append((ref, entry, snaps))
        else:
            missing.append({"model": ref.display(), "checkpoint": final and final.name,
                            "command": _command(ref, final, entry),
                            **({"stale": stale} if stale else {})})
    return runs, missing


def _snapshot_ref(ref: ModelRef, snap: dict) -> ModelRef:
    return replace(ref, weights=snap["file"], label=f"{ref.display()} epoch {snap['epoch']}")


def _curves(ref: ModelRef, entry: dict, snaps: list[dict], ctx, probe, c, level: float
            ) -> dict:
    """One model's data: per layer, CKA to the final model (and its SE) at each snapshot."""
    cka, se, layers, n = {}, {}, None, None
    for s in snaps:
        r = ctx.cka(_snapshot_ref(ref, s), ref, probe, c)
        n = r["n"]
        layers, values, errors = same_layer_cka(r)
        for name, v, e in zip(layers, values, errors):
            cka.setdefault(name, []).append(v)
            se.setdefault(name, []).append(e)
    epochs = [int(s["epoch"]) for s in snaps]
    return {"label": ref.display(), "checkpoint": entry.get("name"), "n": n,
            "final_epoch": entry.get("epochs"), "final_test_accuracy": entry.get("test_accuracy"),
            "epochs": epochs, "layers": layers, "cka": cka, "se": se,
            "settled_epoch": {k: settled_epoch(epochs, v, level) for k, v in cka.items()},
            **{k: [s.get(k) for s in snaps] for k in ("test_accuracy", "train_accuracy")}}


def build(spec: dict, ctx) -> list[Path]:
    """Per model: CKA of each layer to the final model across the run's snapshot epochs."""
    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    level = spec.get("settle", SETTLE)
    # A string would fail in float() without naming the key, and true would pass as 1.0.
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level <= 1:
        raise UserError(f"{ctx.name}: settle={level!r} must be a CKA level in (0, 1], e.g. "
                        "settle = 0.9; fix the file")
    level = float(level)
    if not isinstance(spec["models"], list) or not spec["models"]:
        raise UserError(f"{ctx.name}: models must be a non-empty list, got {spec['models']!r}")
    runs, missing = _runs([ctx.model_ref(m, spec) for m in spec["models"]], ctx)
    if not runs:
        raise InputUnavailable(
            "no training snapshots of " + " or ".join(
                m["model"] + (f" (its entry's snapshots are not of its checkpoint: "
                              f"{m['stale']})" if m.get("stale") else "") for m in missing)
            + f" in {ctx.manifest_path.parent}; make each in one run: "
            + "; ".join(f"`{m['command']}`" for m in missing))
    for m in missing:
        ctx.log(f"{ctx.name}: no snapshots of {m['model']}; make them with `{m['command']}`")
    for ref, _, snaps in runs:  # every store first: a missing file skips before any CKA
        for s in snaps:
            ctx.store(_snapshot_ref(ref, s), probe)
        ctx.store(ref, probe)
    models = [_curves(ref, entry, snaps, ctx, probe, c, level) for ref, entry, snaps in runs]
    title = draw.spec_title(spec, "Training dynamics: CKA of each layer to the final model", c,
                            models[0]["n"])
    if missing:
        title += "\nno snapshots of " + ", ".join(m["model"] for m in missing)
    ctx.data.update(models=models, missing=missing, settle=level, cka=c)
    return ctx.save(draw.dynamics(models, title, level))
