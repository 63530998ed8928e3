"""``figures/REPORT.md``: the study's results, rebuilt after each full ``repsim figures`` run
from the figures' records: each figure with a caption of numbers from its data, the accuracy
table, and what could not be built here and why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from repsim import paths
from repsim.figures import draw

QUESTION = """\
# Why does a ViT trained on small data fall behind ResNet-18? Results

Zhu, Chen & Yang 2023 ask why a Vision Transformer trained on CIFAR-10 alone (81.36 % in
their table) falls behind ResNet-18 (92.8 %), and answer with CKA heatmaps and attention
maps. Below, each figure `repsim figures` built here, with a caption computed from the data
behind it (`figures/<spec>.json`); SE is the jackknife standard error over images.
"""
MATCH = 0.5  # a best match at or above this CKA counts as "matches" in captions


def _span(names, order: list[str]) -> str:
    """``names`` as runs of neighbours in ``order``, e.g. ``embed..blocks.2, blocks.5``: a run
    ``a..c`` claims every layer between, so layers that are not neighbours are not one run."""
    idx = sorted(order.index(n) for n in names)
    runs, start = [], idx[0]
    for prev, nxt in zip(idx, idx[1:] + [None]):
        if nxt != prev + 1:
            runs.append(order[prev] if start == prev else f"{order[start]}..{order[prev]}")
            start = nxt
    return ", ".join(runs)


def _fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:.2f}"


def match_caption(label_a: str, label_b: str, layers_a: list[str], layers_b: list[str],
                  match: dict) -> str:
    """Two lines: which layers of A find a match in B (CKA >= ``MATCH``) and which do not;
    ``match``: each layer of A's best match (:func:`repsim.figures.draw.best_matches`)."""
    best, value, se = match["index"], match["value"], match.get("se")
    hit = [i for i, v in enumerate(value) if v is not None and v >= MATCH]
    miss = [i for i in range(len(layers_a)) if i not in hit]
    out = []
    if hit:
        vals = [value[i] for i in hit]
        ses = [s for s in (se[i] for i in hit) if s is not None] if se else []
        out.append(f"{label_a} {_span([layers_a[i] for i in hit], layers_a)} best match "
                   f"{label_b} {_span({layers_b[best[i]] for i in hit}, layers_b)} "
                   f"at CKA {_fmt(min(vals))}-{_fmt(max(vals))}"
                   + (f" (SE <= {max(ses):.3f})" if ses else "") + ".")
    if miss:
        top = max((value[i] for i in miss if value[i] is not None), default=None)
        out.append(f"{label_a} {_span([layers_a[i] for i in miss], layers_a)} match nothing in "
                   f"{label_b} above {_fmt(top)}.")
    return "\n".join(out)


def _null_caption(panels: list[dict]) -> list[str]:
    """One line per pair of models whose panel has p-values: how many cells are not above
    the permutation null (the dotted ones), or that every one is."""
    out, seen = [], set()
    for p in panels:
        pair = frozenset((p["row_model"], p["col_model"]))
        ps = [v for row in p.get("p_value") or [] for v in row]
        if len(pair) < 2 or pair in seen or not ps:
            continue
        seen.add(pair)
        above = [v for v in ps if v is not None and v <= draw.ALPHA]
        pair_name = f"{p['row_model']} vs {p['col_model']}"
        out.append(f"Permutation null: every cell of {pair_name} above it (p <= {max(above):.3f})."
                   if len(above) == len(ps) else f"Permutation null: {len(ps) - len(above)} of "
                   f"{len(ps)} cells of {pair_name} not above it (p > {draw.ALPHA}, dotted).")
    return out


def _cka_grid(data: dict) -> str:
    return "\n".join([match_caption(p["row_model"], p["col_model"], p["layers_a"],
                                    p["layers_b"], draw.best_matches(p))
                      for p in data["panels"] if p["row_model"] != p["col_model"]]
                     + _null_caption(data["panels"]))


def _best_match(data: dict) -> str:
    return "\n".join(match_caption(c["label_a"], c["label_b"], c["layers_a"], c["layers_b"], c)
                     for c in data["curves"])


def _accuracy(data: dict) -> str:
    return "\n".join(f"{r['model']} on {r['dataset']}: ours {_fmt(r['ours (%)'])} % against "
                     f"the study's {r['study (%)']:.2f} %." for r in data["rows"]
                     if r.get("ours (%)") is not None)


def _data_scale(data: dict) -> str:
    out = []
    for panel in data["panels"]:
        base = panel.get("base_accuracy")
        out.append(f"{panel['label']}, full data" + (f" {base:.2f} %" if base is not None
                                                     else "") + ":")
        for e in panel["entries"]:
            cka, acc = [v for v in e["cka"] if v is not None], e.get("test_accuracy")
            low = e["layers"][e["cka"].index(min(cka))] if cka else None
            out.append(f"- {e['fraction']:g} of the data" + (f" ({acc:.2f} %)" if acc is not None
                                                             else "")
                       + (f": CKA to the full-data model, layer by layer, {_fmt(min(cka))} "
                          f"({low})-{_fmt(max(cka))}." if cka else "."))
        if panel.get("missing"):
            out.append("- missing fractions: " + ", ".join(f"{f:g}" for f in panel["missing"])
                       + ".")
    for m in data.get("missing") or []:
        out.append(f"{m['base']}: no fraction checkpoints (missing "
                   + ", ".join(f"{f:g}" for f in m["fractions"]) + ").")
    return "\n".join(out)


def _attention(data: dict) -> str:
    out = []
    for m in data["models"]:
        d = [sum(row) / len(row) for row in m["distance_image_px"]]
        out.append(f"{m['label']}: mean attention distance {d[0]:.1f} px in block 0, "
                   f"{d[-1]:.1f} px in block {len(d) - 1} (image pixels).")
    return "\n".join(out)


def _featuremaps(data: dict) -> str:
    stages = data["stages"]
    return (f"{len(data['image_ids'])} images; the strongest channels of "
            + ", ".join(f"{s} (of {v['num_channels']})" for s, v in stages.items()) + ".")


def _locality(data: dict) -> str:
    s, layers = data["summary"], data["layers"]
    rows = [i for i, name in enumerate(layers) if name != "input"]
    first, last = rows[0], rows[-1]
    pct = ["nan" if v is None else f"{100 * v:.0f}" for v in s["peak_at_own"]]
    out = [f"A token's CKA with its own input patch: {_fmt(s['own'][first])} in "
           f"{layers[first]}, {_fmt(s['own'][last])} in {layers[last]} (elsewhere "
           f"{_fmt(s['elsewhere'][first])}, {_fmt(s['elsewhere'][last])}); tokens peaking at "
           f"their own cell: {pct[first]} %, {pct[last]} %."]
    pos = data.get("position_cka")
    # The labels drawn (data of older builds has none: the study's two models, then)
    vit, cnn = [*(data.get("labels") or ["ViT", "ResNet"]), "CNN"][:2]
    if pos and pos.get("matrix"):
        out.append("Place by place: " + match_caption(
            vit, cnn, pos["layers_a"], pos["layers_b"], draw.best_matches(pos)))
    return "\n".join(out)


def _probes(data: dict) -> str:
    out = [f"A linear probe on the raw pixels: {data['pixel_accuracy']:.3f}."]
    for e in data["entries"]:
        acc = [row[0] for row in e["accuracy"]]
        best = max(range(len(acc)), key=lambda i: -1 if acc[i] is None else acc[i])
        k = e["ks"][1] if len(e["ks"]) > 1 else None
        line = (f"{e['label']}: probe accuracy {_fmt(acc[0])} in {e['layers'][0]} to "
                f"{_fmt(acc[-1])} in {e['layers'][-1]}, highest {_fmt(acc[best])} in "
                f"{e['layers'][best]}")
        if k is not None:
            match = e["match_cka"][-1]
            line += (f"; {e['layers'][-1]} without its top {k} principal component(s): probe "
                     f"{_fmt(e['accuracy'][-1][1])}, CKA with itself "
                     f"{_fmt(e['self_cka'][-1][1])}, CKA with its best match "
                     f"{e['match_layers'][-1]} {_fmt(match[0])} -> {_fmt(match[1])}")
        out.append(line + ".")
    return "\n".join(out)


def _dynamics(data: dict) -> str:
    out = []
    for m in data["models"]:
        settled = m["settled_epoch"]
        # A snapshot at the final epoch is the final model: reaching the level there alone
        # (CKA 1 by construction) is not settling during training.
        last = m["epochs"][-1] if m["epochs"][-1] == m["final_epoch"] else None
        early = [k for k in m["layers"] if settled.get(k) not in (None, last)]
        final = [k for k in m["layers"] if last is not None and settled.get(k) == last]
        late = [k for k in m["layers"] if settled.get(k) is None]
        acc = m.get("final_test_accuracy")
        first = [v[0] for v in m["cka"].values() if v[0] is not None]  # None: no CKA there
        line = (f"{m['label']} (final: epoch {m['final_epoch']}"
                + (f", {acc:.2f} %" if acc is not None else "") + "): CKA to the final model "
                f"at epoch {m['epochs'][0]} {_fmt(min(first, default=None))}-"
                f"{_fmt(max(first, default=None))}")
        if early:
            line += "; at or above {:.2f} from epoch ".format(data["settle"]) + ", ".join(
                f"{settled[k]} ({k})" for k in early)
        if final:
            line += f"; not before the final model (epoch {last}): {_span(final, m['layers'])}"
        if late:
            line += f"; not settled by epoch {m['epochs'][-1]}: {_span(late, m['layers'])}"
        out.append(line + ".")
    return "\n".join(out)


CAPTIONS: dict[str, Callable[[dict], str]] = {
    "cka_grid": _cka_grid, "best_match": _best_match, "accuracy_table": _accuracy,
    "data_scale": _data_scale, "attention": _attention, "featuremaps": _featuremaps,
    "locality": _locality, "probes": _probes, "dynamics": _dynamics}


def caption(kind: str, data: dict, spec: dict) -> str:
    """The figure's caption from its data; the spec's description for other kinds."""
    if kind not in CAPTIONS:
        return (spec.get("description") or "").strip()
    try:
        return CAPTIONS[kind](data)
    except (KeyError, IndexError, TypeError, ValueError):  # data of an older kind version
        return ""


def _portable(text: str) -> str:
    """``text`` without this machine's paths: the working folder's prefix dropped, the home
    folder as ``~``, so the committed report is the same on every clone."""
    return text.replace(str(Path.cwd()) + os.sep, "").replace(str(Path.home()), "~")


def _section(out: Path, name: str, record: dict, kept: dict | None = None) -> str:
    img = [Path(f) for f in record.get("files", []) if f.endswith(".png")]
    body = [f"## {record.get('title') or name}", ""]
    if record.get("kind") == "accuracy_table" and (out / f"{name}.md").is_file():
        table = (out / f"{name}.md").read_text().split("\n", 2)[-1]  # without its heading
        body += [table.strip(), ""]
    # Percent-encoded: a name with spaces or brackets is no Markdown link target as it is.
    body += [f"![{name}]({quote(f.name)})" for f in img] + ([""] if img else [])
    text = caption(record.get("kind", ""), record.get("data") or {}, record.get("spec") or {})
    if kept:
        text += (f"\n\nBuilt on {record.get('hardware') or 'another machine'}; not rebuilt "
                 f"here: {_portable(kept['reason'])}")
        if kept.get("settings"):
            text += f"\n\nNot of this run's probe settings: {kept['settings']}."
        if kept.get("changed"):
            text += ("\n\nIts numbers are of weights that are not the files here now: "
                     + "; ".join(kept["changed"]) + ".")
        if kept.get("images_changed"):
            text += ("\n\nIts numbers are of other probe images than these here now: "
                     + "; ".join(kept["images_changed"]) + ".")
    return "\n".join(body + ([text.strip(), ""] if text.strip() else []))


def write_report(out: str | Path, names: list[str], summary: dict[str, Any]) -> Path:
    """Write ``out/REPORT.md`` for the specs ``names`` (in order) from their records in
    ``out`` and this run's ``summary`` (skipped and failed specs, with their reasons)."""
    out = Path(out)
    missing = {e["name"]: e["reason"] for k in ("skipped", "failed") for e in summary[k]}
    parts = [QUESTION]
    records = {n: json.loads((out / f"{n}.json").read_text()) for n in names
               if n not in missing and (out / f"{n}.json").is_file()}
    # figures first, then the tables (the accuracy table closes the results)
    kept = {e["name"]: e for e in summary.get("kept", [])}
    for name in sorted(records, key=lambda n: records[n].get("kind") == "accuracy_table"):
        parts.append(_section(out, name, records[name], kept.get(name)))
    if missing:
        parts.append("## Not built here\n\n" + "\n".join(
            f"- `{n}`: {_portable(r)}" for n, r in sorted(missing.items())) + "\n")
    path, text = out / "REPORT.md", "\n".join(parts)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path  # unchanged: not rewritten, so a cached run touches nothing
    return paths.write_text(path, text)


def kept_note(entry: dict) -> str:
    """For a kept figure of other probe settings than this run's, or read from weights or
    probe images that are not those here: which, after "; "."""
    changed, other = entry.get("changed"), entry.get("settings")
    images = entry.get("images_changed")
    return ((f"; not of this run's probe settings: {other}" if other else "")
            + ("; its numbers are of other weights than the files here: " + "; ".join(changed)
               if changed else "")
            + ("; its numbers are of other probe images than these here: " + "; ".join(images)
               if images else ""))


def summary_text(summary: dict) -> str:
    """What ``repsim figures`` prints of :func:`repsim.figures.runner.build_all`'s ``summary``:
    a line per figure (its files, or why kept, skipped or failed, and a kept one's changed
    weights), then the counts."""
    lines = [f"{status:8s}{e['name']}: {', '.join(e['files'])}"
             for status in ("built", "cached") for e in summary[status]]
    lines += [f"{status:8s}{e['name']}: {e['reason']}" + kept_note(e)
              for status in ("kept", "skipped", "failed") for e in summary[status]]
    counts = ", ".join(f"{len(summary[k])} {k}"
                       for k in ("built", "cached", "skipped", "failed", "kept"))
    if summary.get("report_stale"):
        lines.append(f"{summary['report_stale']} not updated: it is of the last full run; "
                     "build every spec to update it")
    seconds = summary.get("seconds", 0.0)
    lines.append(f"figures in {os.path.abspath(summary['out'])}: {counts} ({seconds:.0f} s)")
    return "\n".join(lines)
