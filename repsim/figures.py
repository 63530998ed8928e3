"""``repsim figures``: build every figure and table of the study from ``analyses/*.toml``.

**Specs.** One small TOML file per figure; its stem names the outputs
(``analyses/cka_grid.toml`` -> ``figures/cka_grid.png``, ``.pdf``, ``.json``). Common keys::

    kind = "cka_grid"                 # which builder (see KINDS / --list-kinds)
    title = "..."                     # optional
    models = ["vit_cifar", {model = "vit_cifar", weights = "vit_cifar_frac0.1.pt",
              label = "ViT 10%", layers = "blocks.*"}]   # a name, or a table
    [labels]                          # optional display names per model name
    vit_cifar = "ViT (CIFAR-10)"
    [probe]                           # which images: repsim.compare.ProbeSpec fields
    dataset = "cifar10-probe"         # dataset, split, n, seed, reduce, dtype
    [cka]                             # kernel, estimator, batch_size, batch_seed, threshold
    estimator = "minibatch"

A relative ``weights`` file is looked up in the checkpoint folder. ``repsim figures --n N
--dataset D --data-root DIR`` override ``[probe]`` for every spec.

**Kinds.** A builder is registered with the :func:`figure_kind` decorator from any module
(imported before the build; ``EXTRA_KIND_MODULES`` lists the ones this module imports)::

    @figure_kind("attention", fields=("model", "images"))
    def build_attention(spec: dict, ctx: FigureContext) -> list[Path]:
        model, prov = ctx.model(ctx.model_ref(spec["model"]))   # tracked input
        probe = ctx.images(ctx.probe_spec(spec))                # tracked input
        ...
        ctx.data["whatever"] = ...        # JSON-able data saved in figures/<name>.json
        return ctx.save(fig)              # figures/<name>.png and .pdf

``spec`` is the parsed TOML (with overrides applied); ``fields`` are the kind's own keys
(the first is required unless ``required`` says otherwise); unknown keys are refused, so
typos fail loudly. Raise :class:`repsim.compare.InputUnavailable` (or let ``ctx`` raise it)
when an input cannot be had here: the figure is skipped with that one line and the others
are still built.

**Caching.** Every input a builder reads through ``ctx`` (``ctx.cka``, ``ctx.store``,
``ctx.model``, ``ctx.images``, ``ctx.manifest``, ``ctx.checkpoints``) is recorded with a
fingerprint (store provenance digests, CKA result keys and matrix digests, weights sha256,
sample-ID digests, file hashes). ``figures/<name>.json`` holds the ``cache_key``: a hash of
the effective spec, the kind and its version, the repsim version and those fingerprints.
A re-run re-derives the recorded fingerprints (cheap: stores and CKA results are themselves
cached) and rebuilds only figures whose key changed or whose files are missing. The JSON is
written last, so a crash mid-figure never looks complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from repsim import __version__, paths
from repsim.compare import InputUnavailable, ProbeSpec
from repsim.errors import UserError

FORMAT = "repsim-figure/1"
COMMON_KEYS = ("kind", "title", "description", "probe", "cka", "labels")
PROBE_KEYS = tuple(f.name for f in fields(ProbeSpec) if f.name not in ("data_root", "device"))
CKA_KEYS = ("kernel", "estimator", "batch_size", "batch_seed", "threshold")
# Modules that register more kinds, imported when a spec names a kind not yet registered
# (a module that does not exist is not an error).
EXTRA_KIND_MODULES = ("repsim.attention_figures", "repsim.featuremaps")

Builder = Callable[[dict, "FigureContext"], list[Path]]


@dataclass(frozen=True)
class FigureKind:
    name: str
    build: Builder
    fields: tuple[str, ...]  # the kind's own spec keys
    required: tuple[str, ...]
    version: str  # bump to invalidate cached figures of this kind
    doc: str


KINDS: dict[str, FigureKind] = {}


def figure_kind(name: str, *, fields: tuple[str, ...] = (), required: tuple[str, ...] | None
                = None, version: str = "1"):
    """Register ``builder(spec, ctx) -> list[Path]`` as the figure kind ``name``."""

    def deco(build: Builder) -> Builder:
        req = tuple(fields[:1]) if required is None else tuple(required)
        doc = (build.__doc__ or "").strip().splitlines()
        KINDS[name] = FigureKind(name, build, tuple(fields), req, version,
                                 doc[0] if doc else "")
        return build

    return deco


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ModelRef:
    """A model in a spec: registry name, optional weights file, display label, layers."""

    model: str
    weights: str | None = None
    label: str | None = None
    layers: str | None = None

    def display(self) -> str:
        if self.label:
            return self.label
        return self.model + (f" ({Path(self.weights).stem})" if self.weights else "")


DEPENDENCIES: dict[str, Callable[[FigureContext, dict], tuple[Any, Any]]] = {}


def dependency(kind: str):
    """Register how an input of type ``kind`` is computed from its description:
    ``fn(ctx, desc) -> (value, fingerprint)``; fingerprints must be JSON-able."""

    def deco(fn):
        DEPENDENCIES[kind] = fn
        return fn

    return deco


class FigureContext:
    """What a builder sees: settings, tracked inputs, and where to write.

    State: one run's memo of inputs (a store or CKA result is computed once per run however
    many figures use it) and the current figure's recorded dependencies and data.
    """

    def __init__(self, out_dir: Path, overrides: dict | None = None, force: bool = False,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 cache_dir: Path | None = None, device: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.device = device  # where to extract and compute; not part of any cache key
        self.force = force
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.cache_dir = cache_dir or paths.cache_dir("cka")
        self.name = ""  # the figure being built
        self.data: dict = {}
        self._memo: dict[str, tuple[Any, Any]] = {}
        self._deps: dict[str, Any] | None = None

    # ----------------------------------------------------------------- settings

    def probe_spec(self, spec: dict) -> ProbeSpec:
        """The spec's ``[probe]`` with the command line's overrides applied."""
        p = dict(spec.get("probe") or {})
        p.update(self.overrides)
        return ProbeSpec(**p)

    def _probe(self, d: dict) -> ProbeSpec:
        """A probe from an input description, set to run on this run's device."""
        return ProbeSpec(**{**d, "device": self.device})

    def cka_settings(self, spec: dict) -> dict:
        c = {"kernel": "linear", "estimator": "biased", "batch_size": None, "batch_seed": 0,
             "threshold": 1.0}
        c.update(spec.get("cka") or {})
        if c["estimator"] == "minibatch" and c.get("batch_size") is None:
            raise UserError(f"{self.name}: [cka] estimator = 'minibatch' needs batch_size")
        if c["estimator"] != "minibatch":
            c["batch_size"] = None
        return c

    def model_ref(self, item: str | dict, spec: dict | None = None) -> ModelRef:
        """A ``models`` entry (name or table) as a :class:`ModelRef`; relative weights files
        are looked up in the checkpoint folder; labels from ``[labels]`` apply."""
        from repsim import models

        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise UserError(f"{self.name}: model entry {item!r} is neither a name nor a table "
                            "with a 'model' key")
        extra = set(item) - {"model", "weights", "label", "layers"}
        if extra:
            raise UserError(f"{self.name}: model entry keys {sorted(extra)} are unknown; "
                            "valid: model, weights, label, layers")
        w = item.get("weights")
        if w not in (None, "random") and not Path(w).is_absolute():
            w = str(models.checkpoint_dir() / w)
        label = item.get("label") or ((spec or {}).get("labels") or {}).get(item["model"])
        return ModelRef(item["model"], w, label, item.get("layers"))

    # ----------------------------------------------------------------- tracked inputs

    def need(self, desc: dict) -> Any:
        """The value of the input ``desc`` (memoised per run), recorded for the cache."""
        k = json.dumps(desc, sort_keys=True)
        if k not in self._memo:
            fn = DEPENDENCIES.get(desc.get("type"))
            if fn is None:
                raise UserError(f"unknown input type {desc.get('type')!r}")
            try:
                self._memo[k] = fn(self, desc)
            except InputUnavailable as exc:  # ask once per run, not once per figure
                self._memo[k] = (exc, None)
        value, fingerprint = self._memo[k]
        if isinstance(value, InputUnavailable):
            raise value
        if self._deps is not None:
            self._deps[k] = fingerprint
        return value

    def store(self, ref: ModelRef, probe: ProbeSpec):
        """The activation store of ``ref`` on ``probe`` (:class:`repsim.compare.StoreRef`),
        extracted on demand; InputUnavailable when its weights cannot be had."""
        return self.need({"type": "store", "ref": asdict(ref), "probe": asdict(probe)})

    def cka(self, a: ModelRef, b: ModelRef, probe: ProbeSpec, settings: dict) -> dict:
        """CKA result dict (as ``repsim cka`` writes it) with rows = ``a``'s layers.

        Each unordered pair is computed once (in a fixed order) and transposed on demand.
        """
        ka, kb = json.dumps(asdict(a), sort_keys=True), json.dumps(asdict(b), sort_keys=True)
        first, second = (a, b) if ka <= kb else (b, a)
        res = self.need({"type": "cka", "a": asdict(first), "b": asdict(second),
                         "probe": asdict(probe), "cka": settings})
        if (first, second) == (a, b):
            return res
        return {**res, "model_a": res["model_b"], "model_b": res["model_a"],
                "layers_a": res["layers_b"], "layers_b": res["layers_a"],
                "matrix": [list(col) for col in zip(*res["matrix"])]}

    def model(self, ref: ModelRef):
        """``(model, provenance)`` loaded on CPU; InputUnavailable when weights are missing."""
        return self.need({"type": "model", "ref": asdict(ref)})

    def images(self, probe: ProbeSpec):
        """The :class:`repsim.data.ProbeSet` of ``probe``."""
        return self.need({"type": "images", "probe": asdict(probe)})

    def manifest(self) -> dict | None:
        """``checkpoints/manifest.json`` parsed, or None when there is none."""
        return self.need({"type": "manifest"})

    def checkpoints(self, base: str, pattern: str) -> list[dict]:
        """Checkpoints of model ``base`` whose name matches ``pattern``: dicts with name,
        file (path), train_fraction and the manifest entry (if any), sorted by fraction."""
        return self.need({"type": "checkpoints", "base": base, "pattern": pattern})

    # ----------------------------------------------------------------- outputs

    def path(self, suffix: str) -> Path:
        """``<out>/<figure name><suffix>``, e.g. ``ctx.path('.csv')``."""
        return self.out_dir / f"{self.name}{suffix}"

    def save(self, fig) -> list[Path]:
        """Write ``fig`` as ``<out>/<name>.png`` and ``.pdf``."""
        from repsim import plots

        return plots.save(fig, self.out_dir / self.name)

    def write_text(self, suffix: str, text: str) -> Path:
        return paths.write_text(self.path(suffix), text)


# --------------------------------------------------------------------------- dependency types


@dependency("store")
def _dep_store(ctx: FigureContext, d: dict):
    from repsim.compare import resolve_store

    ref, probe = ModelRef(**d["ref"]), ctx._probe(d["probe"])
    s = resolve_store(ref.model, weights=ref.weights, probe=probe, label=ref.display(),
                      force=ctx.force, progress=ctx.progress, log=ctx.log)
    return s, s.identity_sha256


@dependency("cka")
def _dep_cka(ctx: FigureContext, d: dict):
    from repsim.compare import CKAConfig, resolve_input, run_cka

    a, b, probe, c = ModelRef(**d["a"]), ModelRef(**d["b"]), ctx._probe(d["probe"]), d["cka"]
    sides = []
    for ref in (a, b):
        store = ctx.store(ref, ProbeSpec(**d["probe"]))
        if ref.layers is None:
            sides.append((store, None))
        else:  # a store of exactly those layers when the default one lacks them
            sides.append(resolve_input(ref.model, ref.weights, ref.layers, ref.display(),
                                       False, dict(probe=probe, progress=ctx.progress,
                                                   log=ctx.log)))
    (sa, la), (sb, lb) = sides
    la = la if la is None or isinstance(la, str) else ",".join(la)
    lb = lb if lb is None or isinstance(lb, str) else ",".join(lb)
    cfg = CKAConfig(a=str(sa.path), b=str(sb.path), label_a=a.display(), label_b=b.display(),
                    layers_a=la, layers_b=lb, kernel=c["kernel"], estimator=c["estimator"],
                    threshold=c["threshold"], batch_size=c["batch_size"],
                    batch_seed=c["batch_seed"], probe=probe,
                    out=str(ctx.cache_dir / probe.tag()), plots=False, force=ctx.force,
                    device=probe.device, progress=ctx.progress, log=ctx.log)
    res = run_cka(cfg)["result"]
    return res, {"key": res["cache_key"], "matrix": paths.digest(res["matrix"])}


@dependency("model")
def _dep_model(ctx: FigureContext, d: dict):
    from repsim import models
    from repsim.compare import weights_problem

    ref = ModelRef(**d["ref"])
    problem = weights_problem(ref.model, ref.weights)
    if problem:
        raise InputUnavailable(problem)
    model, prov = models.load_model(ref.model, ref.weights)
    return (model, prov), {k: prov.get(k) for k in ("model", "weights", "weights_sha256")}


@dependency("images")
def _dep_images(ctx: FigureContext, d: dict):
    from repsim.data import load_probe_set

    p = ctx._probe(d["probe"])
    ps = load_probe_set(p.dataset, p.split, n=p.n, seed=p.seed, data_root=p.data_root,
                        progress=ctx.progress)
    return ps, ps.provenance()


def _manifest_path() -> Path:
    from repsim import models

    return models.checkpoint_dir() / "manifest.json"


@dependency("manifest")
def _dep_manifest(ctx: FigureContext, d: dict):
    path = _manifest_path()
    if not path.is_file():
        return None, None
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(data.get("checkpoints"), list):
        raise UserError(f"{path} has no 'checkpoints' list; see the README for its schema")
    return data, hashlib.sha256(raw).hexdigest()


_FRACTION_RE = re.compile(r"frac(?:tion)?[_-]?([0-9]*\.?[0-9]+)")


@dependency("checkpoints")
def _dep_checkpoints(ctx: FigureContext, d: dict):
    from repsim import models

    folder = models.checkpoint_dir()
    manifest = ctx.manifest()
    found: dict[str, dict] = {}
    for e in (manifest or {}).get("checkpoints", []):
        name = str(e.get("name", ""))
        if fnmatch.fnmatchcase(name, d["pattern"]) and e.get("model", d["base"]) == d["base"]:
            frac = e.get("train_fraction")
            path = folder / str(e.get("file", f"{name}.pt"))
            if path.is_file() and isinstance(frac, (int, float)):
                found[name] = {"name": name, "file": str(path), "train_fraction": float(frac),
                               "entry": e}
    for path in sorted(folder.glob(d["pattern"] + ".pt")):  # files the manifest lacks
        m = _FRACTION_RE.search(path.stem)
        if path.stem not in found and m:
            found[path.stem] = {"name": path.stem, "file": str(path),
                                "train_fraction": float(m.group(1)), "entry": None}
    out = sorted(found.values(), key=lambda c: (c["train_fraction"], c["name"]))
    return out, [(c["name"], c["train_fraction"], Path(c["file"]).stat().st_size) for c in out]


# --------------------------------------------------------------------------- built-in kinds


def _title(spec: dict, default: str, c: dict | None = None, n: int | None = None) -> str:
    """The spec's title (or ``default``), with the CKA settings and n on a second line."""
    from repsim import plots

    title = spec.get("title") or default
    if c is None:
        return title
    return f"{title}\n{plots.describe(c['kernel'], c['estimator'], n, c['batch_size'])}"


@figure_kind("cka_grid", fields=("models",))
def build_cka_grid(spec: dict, ctx: FigureContext) -> list[Path]:
    """Heatmaps among all models, self and cross, with one shared colour scale."""
    from repsim import plots

    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    for r in refs:  # every store first: a missing model skips the figure before any CKA
        ctx.store(r, probe)
    panels, n = {}, None
    for i in range(len(refs)):
        for j in range(len(refs)):
            r = ctx.cka(refs[i], refs[j], probe, c)
            panels[(i, j)] = {k: r[k] for k in ("matrix", "layers_a", "layers_b")}
            n = r["n"]
    labels = [r.display() for r in refs]
    fig = plots.cka_grid(labels, panels, _title(spec, "CKA among " + ", ".join(labels), c, n))
    ctx.data["panels"] = [{"row_model": labels[i], "col_model": labels[j], **p}
                          for (i, j), p in sorted(panels.items())]
    ctx.data["n"] = n
    return ctx.save(fig)


@figure_kind("best_match", fields=("pairs",))
def build_best_match(spec: dict, ctx: FigureContext) -> list[Path]:
    """For each layer of model A, the best-matching layer of model B ("diagonal" curves)."""
    from repsim import plots

    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    pairs = spec["pairs"]
    if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs)):
        raise UserError(f"{ctx.name}: pairs must be a list of [A, B] pairs, got {pairs!r}")
    refs = [(ctx.model_ref(a, spec), ctx.model_ref(b, spec)) for a, b in pairs]
    for a, b in refs:
        ctx.store(a, probe)
        ctx.store(b, probe)
    curves, rows, n = [], [], None
    for a, b in refs:
        r = ctx.cka(a, b, probe, c)
        n = r["n"]
        idx, val = plots.best_match_curve(r["matrix"])
        cur = {"label_a": a.display(), "label_b": b.display(), "layers_a": r["layers_a"],
               "layers_b": r["layers_b"], "index": idx.tolist(),
               "value": [None if v != v else float(v) for v in val]}
        curves.append(cur)
        for i, name in enumerate(r["layers_a"]):
            rows.append({"model_a": a.display(), "layer_a": name, "model_b": b.display(),
                         "best_layer_b": r["layers_b"][idx[i]] if idx[i] >= 0 else None,
                         "cka": cur["value"][i]})
    fig = plots.best_match(curves, _title(spec, "Best-matching layers", c, n))
    _, csv_text = plots.table(rows, ["model_a", "layer_a", "model_b", "best_layer_b", "cka"])
    ctx.data["curves"] = curves
    return ctx.save(fig) + [ctx.write_text(".csv", csv_text)]


@figure_kind("accuracy_table", fields=("rows",))
def build_accuracy_table(spec: dict, ctx: FigureContext) -> list[Path]:
    """The study's test accuracies next to ours (from checkpoints/manifest.json)."""
    from repsim import plots

    manifest = ctx.manifest()
    if manifest is None:
        raise InputUnavailable(f"no checkpoint manifest at {_manifest_path()}; train the "
                               "models with `repsim train` (it records each checkpoint there)")
    entries = manifest["checkpoints"]
    rows = []
    for row in spec["rows"]:
        if not {"dataset", "model", "study"} <= set(row):
            raise UserError(f"{ctx.name}: each [[rows]] needs dataset, model and study, got "
                            f"{row!r}")
        extra = set(row) - {"dataset", "model", "study", "label", "recipe", "checkpoint"}
        if extra:
            raise UserError(f"{ctx.name}: [[rows]] keys {sorted(extra)} are unknown; valid: "
                            "dataset, model, study, label, recipe, checkpoint")
        if "checkpoint" in row:
            ours = [e for e in entries if e.get("name") == row["checkpoint"]]
        else:  # the study's recipe on all the data; the plainest run name first
            ours = sorted((e for e in entries if e.get("model") == row["model"]
                           and e.get("dataset") == row["dataset"]
                           and float(e.get("train_fraction", 1.0)) == 1.0
                           and e.get("recipe", "paper") == row.get("recipe", "paper")),
                          key=lambda e: (len(str(e.get("name"))), str(e.get("name"))))
        e = ours[0] if ours else {}
        acc = e.get("test_accuracy")
        rows.append({
            "dataset": row["dataset"], "model": row.get("label", row["model"]),
            "study (%)": float(row["study"]),
            "ours (%)": None if acc is None else float(acc),
            "difference": None if acc is None else float(acc) - float(row["study"]),
            "epochs": (f"{e.get('epochs')}/{e.get('epochs_planned')}" if e else None),
            "recipe": e.get("recipe"), "checkpoint": e.get("name"),
            "data": e.get("data_source"),
        })
    columns = ["dataset", "model", "study (%)", "ours (%)", "difference", "epochs", "recipe",
               "checkpoint"]
    md, csv_text = plots.table(rows, columns)
    title = _title(spec, "Test accuracy")
    note = spec.get("description", "")
    md = f"# {title}\n\n{md}" + (f"\n{note.strip()}\n" if note else "")
    ctx.data["rows"] = rows
    return [ctx.write_text(".md", md), ctx.write_text(".csv", csv_text)]


@figure_kind("data_scale", fields=("base", "checkpoints"), required=("base", "checkpoints"))
def build_data_scale(spec: dict, ctx: FigureContext) -> list[Path]:
    """Models trained on fractions of the data, each compared with the full-data one."""
    from repsim import plots

    probe, c = ctx.probe_spec(spec), ctx.cka_settings(spec)
    base = ctx.model_ref(spec["base"], spec)
    found = ctx.checkpoints(base.model, spec["checkpoints"])
    if not found:
        raise InputUnavailable(
            f"no data-scale checkpoints {spec['checkpoints']!r} of {base.model} in "
            f"{_manifest_path().parent}; train them with `repsim train --model {base.model} "
            f"--train-fraction 0.1` (and 0.25, 0.5, ...), which writes "
            f"{base.model}_frac0.1.pt there")
    ctx.store(base, probe)
    refs = [ModelRef(base.model, cp["file"], f"{base.display()} {cp['train_fraction']:g}",
                     base.layers) for cp in found]
    for r in refs:
        ctx.store(r, probe)
    entries, n = [], None
    for cp, r in zip(found, refs):
        res = ctx.cka(r, base, probe, c)
        n = res["n"]
        acc = (cp["entry"] or {}).get("test_accuracy")
        entries.append({"fraction": cp["train_fraction"], "label": r.display(),
                        "checkpoint": cp["name"], "test_accuracy": acc,
                        "matrix": res["matrix"], "layers_a": res["layers_a"],
                        "layers_b": res["layers_b"]})
    title = _title(spec, f"Data scale: {base.display()} on fractions of the training set", c, n)
    fig = plots.data_scale(base.display(), entries, title)
    ctx.data["entries"] = entries
    return ctx.save(fig)


# --------------------------------------------------------------------------- specs and runs


def _load_extra_kinds() -> None:
    for mod in EXTRA_KIND_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def load_specs(folder: Path, only: list[str] | None = None) -> dict[str, dict]:
    """name -> parsed spec for ``folder/*.toml`` (sorted), validated against the kinds."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no analyses folder at {folder}; run from the repository root or pass "
                        "--analyses DIR (one .toml spec per figure)")
    specs = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            spec = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid TOML ({exc}); fix the file") from None
        _validate(path, spec)
        specs[path.stem] = spec
    if not specs:
        raise UserError(f"{folder} holds no .toml specs; add one per figure (see the README)")
    if only:
        missing = [n for n in only if n not in specs]
        if missing:
            raise UserError(f"no spec named {', '.join(missing)} in {folder}; specs: "
                            f"{', '.join(specs)}")
        specs = {n: specs[n] for n in only}
    return specs


def _validate(path: Path, spec: dict) -> None:
    kind = spec.get("kind")
    if kind not in KINDS:
        _load_extra_kinds()  # kinds registered by other modules, imported only when needed
    if kind not in KINDS:
        raise UserError(f"{path}: kind {kind!r} is unknown; valid kinds: "
                        f"{', '.join(sorted(KINDS))}")
    k = KINDS[kind]
    unknown = set(spec) - set(COMMON_KEYS) - set(k.fields)
    if unknown:
        raise UserError(f"{path}: keys {sorted(unknown)} are unknown for kind {kind!r}; valid: "
                        f"{', '.join(COMMON_KEYS + k.fields)}")
    missing = [f for f in k.required if f not in spec]
    if missing:
        raise UserError(f"{path}: kind {kind!r} needs {', '.join(missing)}")
    for table, keys in (("probe", PROBE_KEYS), ("cka", CKA_KEYS)):
        bad = set(spec.get(table) or {}) - set(keys)
        if bad:
            raise UserError(f"{path}: [{table}] keys {sorted(bad)} are unknown; valid: "
                            f"{', '.join(keys)}")


def _key(name: str, spec: dict, overrides: dict, deps: dict) -> str:
    """What a figure depends on: its spec, the command-line overrides (they change which
    inputs it reads), its kind's version, repsim's version and its inputs' fingerprints."""
    kind = KINDS[spec["kind"]]
    return paths.digest({"format": FORMAT, "name": name, "spec": spec, "overrides": overrides,
                    "kind_version": kind.version, "repsim": __version__, "deps": deps})


def _still_valid(name: str, spec: dict, ctx: FigureContext, record: dict) -> bool:
    """Re-derive the recorded inputs' fingerprints; True when the key still matches."""
    files = [Path(f) for f in record.get("files", [])]
    if not files or not all(f.exists() for f in files):
        return False
    deps = {}
    for k in sorted(record.get("deps") or {}):
        ctx._deps = deps
        ctx.need(json.loads(k))
    ctx._deps = None
    return _key(name, spec, ctx.overrides, deps) == record.get("cache_key")


def build_all(analyses: str | os.PathLike = "analyses", out: str | os.PathLike = "figures",
              only: list[str] | None = None, overrides: dict | None = None,
              device: str | None = None, force: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict:
    """Build every spec in ``analyses`` into ``out``.

    Returns ``{"out", "built", "cached", "skipped", "failed", "seconds"}``: built and cached
    entries list their files; skipped ones (an input unavailable here) and failed ones (a
    user error in that spec or its inputs) give the one-line reason. One figure's problem
    never stops the others.
    """
    from repsim.compare import versions

    t0 = time.perf_counter()
    specs = load_specs(Path(analyses), only)
    say = log or (lambda msg: None)
    ctx = FigureContext(Path(out), overrides, force, progress, say, device=device)
    summary = {"out": str(Path(out)), "built": [], "cached": [], "skipped": [], "failed": []}
    for name, spec in specs.items():
        ctx.name, ctx.data = name, {}
        record_path = ctx.path(".json")
        entry = {"name": name, "kind": spec["kind"]}
        try:
            record = json.loads(record_path.read_text()) if record_path.is_file() else None
        except ValueError:
            record = None
        try:
            if record and not force and _still_valid(name, spec, ctx, record):
                summary["cached"].append({**entry, "files": record["files"]})
                say(f"cached  {name}")
                continue
            say(f"build   {name} ({spec['kind']})")
            ctx._deps = {}
            files = KINDS[spec["kind"]].build(spec, ctx)
            deps = ctx._deps
        except InputUnavailable as exc:
            summary["skipped"].append({**entry, "reason": str(exc)})
            say(f"skipped {name} (reason in the summary)")
            continue
        except (UserError, ValueError) as exc:
            summary["failed"].append({**entry, "reason": str(exc)})
            say(f"failed  {name} (reason in the summary)")
            continue
        finally:
            ctx._deps = None
        files = [str(f) for f in files] + [str(record_path)]
        paths.write_json(record_path, {  # last: its presence with this key means "complete"
            "format": FORMAT, "name": name, "kind": spec["kind"], "title": spec.get("title"),
            "spec": spec, "overrides": ctx.overrides,
            "cache_key": _key(name, spec, ctx.overrides, deps), "deps": deps, "files": files,
            "data": ctx.data, "versions": versions(),
        })
        summary["built"].append({**entry, "files": files})
    summary["seconds"] = time.perf_counter() - t0
    return summary
