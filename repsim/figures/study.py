"""The study's CKA figure kinds (cka_grid, best_match, data_scale) and its accuracy table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from repsim.compare import InputUnavailable
from repsim.errors import UserError
from repsim.figures import draw
from repsim.figures.context import check_weights, same_layer_cka, weights_file


def _stores(ctx, refs: list, probe) -> None:
    """Every store of ``refs`` before any CKA, their weights checked first: otherwise the models
    named before a missing one are extracted for a skipped figure."""
    for ref in refs:
        for seed in ref.seeds():
            check_weights(seed)
    for ref in refs:
        ctx.store(ref, probe)


def cka_grid(spec: dict, ctx) -> list[Path]:
    """Heatmaps among all models, self and cross, with one shared colour scale."""
    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    _stores(ctx, refs, probe)
    panels, n = {}, None
    for i, a in enumerate(refs):
        for j, b in enumerate(refs):
            r = ctx.cka(a, b, probe, c)
            panels[(i, j)] = {k: r.get(k) for k in ("matrix", "layers_a", "layers_b", "se",
                                                    "p_value")}
            n = r["n"]
    labels = [r.display() for r in refs]
    title = draw.spec_title(spec, "CKA among " + ", ".join(labels), c, n)
    if c["permutations"]:
        title += "; " + draw.null_legend(c["permutations"])
    fig = draw.cka_grid(labels, panels, title)
    ctx.data["panels"] = [{"row_model": labels[i], "col_model": labels[j], **p}
                          for (i, j), p in sorted(panels.items())]
    ctx.data.update(n=n, cka=c)  # what the title states
    return ctx.save(fig)


def best_match(spec: dict, ctx) -> list[Path]:
    """For each layer of model A, the best-matching layer of model B ("diagonal" curves)."""
    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    pairs = spec["pairs"]
    if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs)):
        raise UserError(f"{ctx.name}: pairs must be a list of [A, B] pairs, got {pairs!r}")
    refs = [(ctx.model_ref(a, spec), ctx.model_ref(b, spec)) for a, b in pairs]
    _stores(ctx, [r for pair in refs for r in pair], probe)
    curves, rows, n = [], [], None
    for a, b in refs:
        r = ctx.cka(a, b, probe, c)
        n = r["n"]
        cur = {"label_a": a.display(), "label_b": b.display(), "layers_a": r["layers_a"],
               "layers_b": r["layers_b"], **draw.best_matches(r)}
        curves.append(cur)
        rows += [{"model_a": a.display(), "layer_a": name, "model_b": b.display(),
                  "best_layer_b": r["layers_b"][j] if j >= 0 else None,
                  "cka": cur["value"][i], "se": cur["se"][i]}
                 for i, (name, j) in enumerate(zip(r["layers_a"], cur["index"]))]
    fig = draw.best_match(curves, draw.spec_title(spec, "Best-matching layers", c, n))
    ctx.data.update(curves=curves, n=n, cka=c)  # n and c: what the title states
    return ctx.save(fig) + [ctx.write_text(".csv", draw.csv_text(
        rows, ["model_a", "layer_a", "model_b", "best_layer_b", "cka", "se"]))]


ROW_KEYS = ("dataset", "model", "study", "label", "recipe", "checkpoint")


def _check_run(entry: dict, row: dict, where: str) -> None:
    """UserError when a row's named checkpoint is a run of another model or dataset (its
    number would stand as ours for the row's); entries that do not say are taken as named."""
    theirs = (entry.get("model", row["model"]), entry.get("dataset", row["dataset"]))
    if theirs != (row["model"], row["dataset"]):
        raise UserError(f"{where}: [[rows]] checkpoint {row['checkpoint']!r} is a {theirs[0]} "
                        f"run on {theirs[1]}, but its row is {row['model']} on "
                        f"{row['dataset']}; name a checkpoint of that model and dataset, or "
                        "leave checkpoint out; fix the file")


def _accuracy_of(entry: dict | None, where: str) -> float | None:
    """A manifest entry's test accuracy (%), None without one; anything but a number (a
    hand-edited "77.5 %") is refused by name, not failed deep in a float() or a format."""
    acc = (entry or {}).get("test_accuracy")
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float))):
        raise UserError(f"{where}: checkpoint {entry.get('name')!r} has test_accuracy={acc!r}, "
                        "not a number (percent); fix or delete it")
    return None if acc is None else float(acc)


def _accuracy_row(row: dict, entries: list[dict], where: str, manifest: Path,
                  stale: Callable[[dict], str | None]) -> dict:
    """One table row: the study's number next to our checkpoint's (the named one, else the
    study's recipe on all the data, the plainest run name first); a ``note`` when ``stale``
    says the entry is of another version of its file."""
    if not isinstance(row, dict) or not {"dataset", "model", "study"} <= set(row):
        raise UserError(f"{where}: each [[rows]] needs dataset, model and study, got {row!r}")
    extra = set(row) - set(ROW_KEYS)
    if extra:
        raise UserError(f"{where}: [[rows]] keys {sorted(extra)} are unknown; valid: "
                        f"{', '.join(ROW_KEYS)}")
    study = row["study"]
    if isinstance(study, bool) or not isinstance(study, (int, float)):
        raise UserError(f"{where}: [[rows]] study={study!r} must be a number (the study's "
                        "accuracy, %), e.g. study = 81.36; fix the file")
    if "checkpoint" in row:
        ours = [e for e in entries if e.get("name") == row["checkpoint"]]
        _check_run(ours[0] if ours else {}, row, where)
    else:
        ours = sorted((e for e in entries if e.get("model") == row["model"]
                       and e.get("dataset") == row["dataset"]
                       and e.get("train_fraction", 1.0) == 1.0  # null: no full run
                       and e.get("recipe", "paper") == row.get("recipe", "paper")),
                      key=lambda e: (len(str(e.get("name"))), str(e.get("name"))))
    e = ours[0] if ours else {}
    acc = _accuracy_of(e, f"{where}: {manifest}")
    return {"dataset": row["dataset"], "model": row.get("label", row["model"]),
            "study (%)": float(row["study"]), "ours (%)": acc,
            "difference": None if acc is None else acc - float(row["study"]),
            "epochs": f"{e.get('epochs')}/{e.get('epochs_planned')}" if e else None,
            "recipe": e.get("recipe"), "checkpoint": e.get("name"), "data": e.get("data_source"),
            **({"note": note} if (note := stale(e)) else {})}


def accuracy_table(spec: dict, ctx) -> list[Path]:
    """The study's test accuracies next to ours (from checkpoints/manifest.json)."""
    manifest = ctx.manifest()
    if manifest is None:
        raise InputUnavailable(f"no checkpoint manifest at {ctx.manifest_path}; train the "
                               "models with `repsim train` (it records each checkpoint there)")
    rows = [_accuracy_row(row, manifest["checkpoints"], ctx.name, ctx.manifest_path, ctx.stale)
            for row in spec["rows"]]
    notes = [r for r in rows if r.get("note")]
    for r in notes:  # marked in the table too (a note column, only then: agreeing ones hold)
        ctx.log(f"{ctx.name}: {r['model']} on {r['dataset']}: {r['note']}")
    md, csv_text = draw.table(rows, ["dataset", "model", "study (%)", "ours (%)", "difference",
                                     "epochs", "recipe", "checkpoint"]
                              + (["note"] if notes else []))
    note = spec.get("description", "")
    md = f"# {draw.spec_title(spec, 'Test accuracy')}\n\n{md}"
    md += f"\n{note.strip()}\n" if note else ""
    ctx.data["rows"] = rows
    return [ctx.write_text(".md", md), ctx.write_text(".csv", csv_text)]


FRACTIONS = (0.1, 0.25, 0.5)  # the data-scale runs expected by default


def _scale_bases(spec: dict, ctx) -> list[tuple]:
    """``[(base ModelRef, checkpoint pattern)]`` from ``base`` or ``bases`` and
    ``checkpoints`` (default ``{base}_frac*``; ``{base}`` is each base's model name)."""
    if "base" in spec and "bases" in spec:  # else one of them would be dropped unsaid
        raise UserError(f"{ctx.name}: data_scale takes base or bases, not both; put every "
                        f"model in bases, e.g. bases = [\"vit_cifar\", \"resnet18_cifar\"]")
    items = spec.get("bases") or ([spec["base"]] if "base" in spec else [])
    if not isinstance(items, list) or not items:
        raise UserError(f"{ctx.name}: data_scale needs base = \"vit_cifar\" or bases = "
                        f"[\"vit_cifar\", \"resnet18_cifar\"], got {items!r}")
    pattern = spec.get("checkpoints", "{base}_frac*")
    if not isinstance(pattern, str):
        raise UserError(f"{ctx.name}: checkpoints={pattern!r} must be a file-name pattern, "
                        "e.g. \"{base}_frac*\"")
    if len(items) > 1 and "{base}" not in pattern:
        raise UserError(f"{ctx.name}: checkpoints={pattern!r} names one base's files; with "
                        "several bases use {base}, e.g. \"{base}_frac*\"")
    refs = [ctx.model_ref(b, spec) for b in items]
    return [(r, pattern.replace("{base}", r.model)) for r in refs]


def _fraction_ref(base, cp: dict):
    """The model of checkpoint ``cp``, trained on a fraction of the data like ``base``."""
    return replace(base, weights=cp["file"], label=f"{base.display()} {cp['train_fraction']:g}")


def _scale_entry(cp: dict, base, probe, c, ctx) -> dict:
    """One fraction model against the full-data one: the matrix and its same-layer curve."""
    ref = _fraction_ref(base, cp)
    res = ctx.cka(ref, base, probe, c)
    layers, cka, se = same_layer_cka(res)
    return {"fraction": cp["train_fraction"], "label": ref.display(), "checkpoint": cp["name"],
            "test_accuracy": _accuracy_of(cp["entry"], f"{ctx.name}: {ctx.manifest_path}"),
            "n": res["n"],
            "layers": layers, "cka": cka, "se": se,
            "matrix": res["matrix"], "layers_a": res["layers_a"], "layers_b": res["layers_b"]}


def data_scale(spec: dict, ctx) -> list[Path]:
    """Models trained on fractions of the data against the full-data one, per base model:
    same-layer CKA along the depth per fraction, accuracy beside; built from whatever
    fraction checkpoints exist, naming the expected ``fractions`` that do not."""
    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    expected = spec.get("fractions", FRACTIONS)
    if not (isinstance(expected, (list, tuple))
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in expected)):
        raise UserError(f"{ctx.name}: fractions={expected!r} must be a list of numbers, e.g. "
                        "[0.1, 0.25, 0.5]")
    expected = [float(f) for f in expected]
    entries = {e.get("name"): e for e in (ctx.manifest() or {}).get("checkpoints", [])}
    plan, notes = [], []
    for base, pattern in _scale_bases(spec, ctx):
        found = ctx.checkpoints(base.model, pattern)
        have = [cp["train_fraction"] for cp in found]
        missing = [f for f in expected if not any(abs(f - h) < 1e-9 for h in have)]
        final = weights_file(base)
        base_entry = entries.get(final.stem if final else None) or {}
        for what, stale in [(final.stem if final else "", ctx.stale(base_entry)),
                            *((cp["name"], cp["stale"]) for cp in found)]:
            if stale:  # an entry of another version of its file: no accuracy of this one
                ctx.log(f"{ctx.name}: {what}: {stale}; its accuracy is left out")
        base_entry = {} if ctx.stale(base_entry) else base_entry
        recipe = f" --recipe {base_entry['recipe']}" if base_entry.get("recipe") else ""
        if missing:
            f0, more = f"{missing[0]:g}", ", ".join(f"{f:g}" for f in missing[1:])
            notes.append(f"{base.display()} fractions {', '.join(f'{f:g}' for f in missing)} "
                         f"(`repsim train --model {base.model}{recipe} --train-fraction {f0} "
                         f"--out {ctx.manifest_path.parent}/{base.model}_frac{f0}.pt`"
                         + (f", likewise {more}" if more else "") + ")")
        plan.append((base, found, missing, base_entry))
    if not any(found for _, found, _, _ in plan):
        raise InputUnavailable(f"no data-scale checkpoints in {ctx.manifest_path.parent}: "
                               f"missing {'; '.join(notes)}")
    if notes:
        ctx.log(f"{ctx.name}: missing {'; '.join(notes)}")
    for base, found, _, _ in plan:  # every store first: a missing file skips before any CKA
        # (a base without fractions is no panel: its weights are no input of the figure)
        for ref in [base, *(_fraction_ref(base, cp) for cp in found)] if found else ():
            ctx.store(ref, probe)
    panels = [{"label": base.display(), "missing": missing,
               "base_accuracy": _accuracy_of(base_entry, f"{ctx.name}: {ctx.manifest_path}"),
               "entries": [_scale_entry(cp, base, probe, c, ctx) for cp in found]}
              for base, found, missing, base_entry in plan if found]
    n = panels[0]["entries"][0]["n"]
    title = draw.spec_title(spec, "Data scale: models trained on fractions of the training set",
                            c, n)
    skipped = [b.display() for b, found, _, _ in plan if not found]
    if skipped:
        title += f"\nno fraction checkpoints of {', '.join(skipped)}"
    ctx.data.update(panels=panels, expected_fractions=expected, n=n, cka=c,
                    missing=[{"base": b.display(), "fractions": m} for b, _, m, _ in plan if m])
    return ctx.save(draw.data_scale(panels, title))
