"""``repsim figures``: build every figure and table of the study from ``analyses/*.toml``.

One TOML spec per figure; its stem names the outputs (``analyses/grid.toml`` ->
``figures/grid.png``, ``.pdf``, ``.json``); the README lists the keys. :data:`KINDS` maps each
``kind`` to its builder ``build(spec, ctx) -> list[Path]`` (imported on first use; more
register with :func:`figure_kind`), which reads its inputs through ``ctx``
(:class:`repsim.figures.context.FigureContext`) and puts JSON-able data in ``ctx.data``.

``figures/<name>.json``, written last, holds that data, the inputs' fingerprints and a
``cache_key``; a figure is rebuilt only when its key changed or a file is missing. A figure
whose input is unavailable here (:class:`repsim.compare.InputUnavailable`) is skipped in one
line, or ``kept`` when an earlier complete build of it (of the same spec) is here.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repsim import __version__, compare, paths
from repsim.compare import InputUnavailable
from repsim.errors import UserError, os_problem
from repsim.figures.context import FigureContext
from repsim.figures.kept import PROBE_KEYS, changed_images, changed_weights, other_settings
from repsim.sketch import jsonable

FORMAT = "repsim-figure/2"
COMMON_KEYS = ("kind", "title", "description", "probe", "cka", "labels")
CKA_KEYS = ("kernel", "estimator", "batch_size", "batch_seed", "threshold", "permutations")
# The spec keys of the built-in kinds that name models (names or tables), for [labels]
MODEL_FIELDS = ("models", "pairs", "model", "vit", "cnn", "base", "bases")
# The kinds' keys that hold lists: what of, and an example
LISTS = {"models": ("models", 'models = ["vit_cifar", "resnet18_cifar"]'),
         "bases": ("models", 'bases = ["vit_cifar", "resnet18_cifar"]'),
         "pairs": ("[A, B] pairs", 'pairs = [["vit_cifar", "resnet18_cifar"]]'),
         "rows": ("rows", "one [[rows]] table (dataset, model, study) per row")}
# The type of each [probe] and [cka] value; a wrong one would fail deep inside a build.
NUMBER = (int, float)
VALUE_TYPES = {"n": int, "seed": int, "batch_size": int, "batch_seed": int,
               "permutations": int, "threshold": NUMBER}  # the others: strings

Builder = Callable[[dict, "FigureContext"], list[Path]]


@dataclass(frozen=True)
class FigureKind:
    """A builder (or ``"module:function"``, imported on first use), the kind's own spec keys,
    the required ones among them (None: the first), a version (bump it to rebuild that
    kind's figures), and whether it reads the spec's ``[cka]`` table (else it is refused)."""

    build: Builder | str
    fields: tuple[str, ...] = ()
    required: tuple[str, ...] | None = None
    version: str = "1"
    reads_cka: bool = True

    def builder(self) -> Builder:
        if callable(self.build):
            return self.build
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)


KINDS: dict[str, FigureKind] = {
    "cka_grid": FigureKind("repsim.figures.study:cka_grid", ("models",)),
    "best_match": FigureKind("repsim.figures.study:best_match", ("pairs",)),
    "accuracy_table": FigureKind("repsim.figures.study:accuracy_table", ("rows",),
                                 reads_cka=False),
    "data_scale": FigureKind("repsim.figures.study:data_scale",
                             ("base", "bases", "checkpoints", "fractions"), (),
                             "3"),  # 3: several bases, CKA along the depth, accuracy beside
    "dynamics": FigureKind("repsim.figures.dynamics:build", ("models", "settle")),
    "attention": FigureKind("repsim.figures.attention:build_figure",
                            ("models", "images", "ids", "blocks", "unit", "batch_size",
                             "renormalize"), version="2", reads_cka=False),  # 2: blocks from 0
    "featuremaps": FigureKind("repsim.figures.featuremaps:build_figure",
                              ("model", "images", "ids", "stages", "top"),
                              version="2", reads_cka=False),  # 2: colour bars, one per class
    "locality": FigureKind("repsim.figures.locality:build_figure",
                           ("vit", "cnn", "max_images", "tokens")),
    "probes": FigureKind("repsim.figures.probes:build_figure",
                         ("models", "ks", "train_fraction", "split_seed", "weight_decay", "steps"),
                         version="2"),  # 2: components fitted on the training rows only
    # Their CKA among a model's own tokens is debiased, by design; [cka] would be ignored.
    "prefix_tokens": FigureKind("repsim.figures.prefix:build_figure", ("models", "layer"),
                                reads_cka=False),
    "projection_rank": FigureKind("repsim.figures.lowrank:build_figure", ("models",),
                                  reads_cka=False),
}


def figure_kind(name: str, *, fields: tuple[str, ...] | str = (),
                required: tuple[str, ...] | str | None = None, version: str = "1",
                reads_cka: bool = True):
    """Decorator: register ``build(spec, ctx) -> list[Path]`` as the figure kind ``name``
    (``required`` defaults to the first field; see :class:`FigureKind`)."""
    # One key without the tuple's comma, ("model"), is a string: not its letters.
    def keys(v):
        return (v,) if isinstance(v, str) else v if v is None else tuple(v)

    def deco(build: Builder) -> Builder:
        KINDS[name] = FigureKind(build, keys(fields), keys(required), version, reads_cka)
        return build

    return deco


# --------------------------------------------------------------------------- specs and runs


def load_specs(folder: str | os.PathLike, only: list[str] | None = None) -> dict[str, dict]:
    """name -> parsed spec for ``folder/*.toml`` (sorted), validated against the kinds."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no analyses folder at {folder}; run from the repository root or pass "
                        "analyses=<a folder of .toml specs, one per figure>")
    specs, files = {}, sorted(folder.glob("*.toml"))
    missing = [n for n in only or [] if n not in {p.stem for p in files}]
    if missing:
        raise UserError(f"no spec named {', '.join(missing)} in {folder}; specs: "
                        f"{', '.join(p.stem for p in files) or 'none'}")
    # Only the specs asked for: another one being written must not stop them.
    for path in [p for p in files if not only or p.stem in only]:
        try:
            spec = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid TOML ({exc}); fix the file") from None
        _validate(path, spec)
        specs[path.stem] = spec
    if not specs:
        raise UserError(f"{folder} holds no .toml specs; add one per figure (see the README)")
    return {n: specs[n] for n in only} if only else specs


def _models_named(value: Any) -> set[str]:
    """The model names in a spec value: names, ``model`` of tables, inside lists."""
    if isinstance(value, list):
        return set().union(*map(_models_named, value))
    if isinstance(value, dict):
        value = value.get("model")
    return {value} if isinstance(value, str) else set()


def _check_labels(path: Path, spec: dict, kind: FigureKind) -> None:
    """A ``[labels]`` key that names no model of the spec (a typo) would leave that model
    unlabelled without a word; kinds whose models lie elsewhere are not checked."""
    where = [k for k in MODEL_FIELDS if k in kind.fields and k in spec]
    labels = spec.get("labels")
    if not where or not isinstance(labels, dict):
        return
    named = set().union(*(_models_named(spec[k]) for k in where))
    stray = sorted(set(labels) - named)
    if stray:
        raise UserError(f"{path}: [labels] keys {stray} name no model of this spec; its "
                        f"models: {', '.join(sorted(named))}; fix the file")


def _validate(path: Path, spec: dict) -> None:
    # Its messages write a key as TOML does, `key = value`: the CLI prints a library's
    # `name=value` as the flag `--name value`, and a spec file's key is no flag.
    kind = KINDS.get(spec.get("kind")) if isinstance(spec.get("kind"), str) else None
    if kind is None:  # a list would not even be looked up (unhashable)
        raise UserError(f"{path}: kind {spec.get('kind')!r} is unknown; valid kinds: "
                        f"{', '.join(sorted(KINDS))}")
    unknown = set(spec) - set(COMMON_KEYS) - set(kind.fields)
    if unknown:
        raise UserError(f"{path}: keys {sorted(unknown)} are unknown for kind "
                        f"{spec['kind']!r}; valid: {', '.join(COMMON_KEYS + kind.fields)}")
    if "cka" in spec and not kind.reads_cka:
        raise UserError(f"{path}: [cka] is not read by kind {spec['kind']!r}, so its settings "
                        "would be ignored; fix: remove the [cka] table")
    needs = kind.fields[:1] if kind.required is None else kind.required
    missing = [f for f in needs if f not in spec]
    if missing:
        raise UserError(f"{path}: kind {spec['kind']!r} needs {', '.join(missing)}")
    for table, keys in (("probe", PROBE_KEYS), ("cka", CKA_KEYS), ("labels", None)):
        values = spec.get(table, {})
        if not isinstance(values, dict):
            raise UserError(f"{path}: {table} = {values!r} must be a table ([{table}]); fix "
                            "the file")
        bad = set(values) - set(keys) if keys else ()
        if bad:
            raise UserError(f"{path}: [{table}] keys {sorted(bad)} are unknown; valid: "
                            f"{', '.join(keys)}")
        for k, v in values.items() if keys else ():  # labels: checked where used
            want = VALUE_TYPES.get(k, str)
            if not isinstance(v, want) or isinstance(v, bool):
                what = {int: "an integer", NUMBER: "a number", str: "a string"}[want]
                raise UserError(f"{path}: [{table}] {k} = {v!r} must be {what}; fix the file")
    for key in ("title", "description"):  # else .strip() in the report fails the whole run
        if not isinstance(spec.get(key, ""), str):
            raise UserError(f"{path}: {key} = {spec[key]!r} must be a string; fix the file")
    for key, (what, example) in LISTS.items():  # a name here would be read letter by letter
        v = spec.get(key, [None])
        if key in kind.fields and not (isinstance(v, list) and v):
            raise UserError(f"{path}: {key} = {v!r} must be a non-empty list of {what}, e.g. "
                            f"{example}; fix the file")
    _check_labels(path, spec, kind)


def cache_key(name: str, spec: dict, overrides: dict, deps: dict) -> str:
    """What a figure depends on: its spec, the command-line overrides that change which
    inputs it reads, its kind's version, repsim's version, the content versions of the
    extractor and of the CKA engine (raised by fixes to what stores hold and to CKA's numbers)
    and its inputs' fingerprints."""
    from repsim import extraction, sketch

    # Each left out at its value when it entered this key (extractor 2, engine 1), so the
    # figures built until then keep their keys; a raise rebuilds every figure.
    versions = {k: v for k, v, first in (("content", extraction.CONTENT_VERSION, 2),
                                         ("engine", sketch.CONTENT_VERSION, 1)) if v != first}
    return paths.digest({"format": FORMAT, "name": name, "spec": spec, "overrides": overrides,
                         "kind_version": KINDS[spec["kind"]].version, "repsim": __version__,
                         "deps": deps, **versions})


def _files_here(ctx: FigureContext, record: dict) -> list[Path] | None:
    """The record's files in the output folder (by name, so a moved or imported folder keeps
    its builds); None when any is missing."""
    files = [ctx.out_dir / Path(f).name for f in record.get("files", [])]
    return files if files and all(f.exists() for f in files) else None


def _still_valid(name: str, spec: dict, ctx: FigureContext, record: dict) -> bool:
    """True when the record's files exist and its key matches its inputs' fingerprints now."""
    if _files_here(ctx, record) is None or _marker(ctx.path(".json")).exists():
        return False  # no file, or a build that may have rewritten some stopped (_set_aside)
    try:
        deps = {k: ctx.fingerprint(json.loads(k)) for k in record.get("deps") or {}}
    # A record of another format, or an input gone (the builder then says which, and why).
    except (KeyError, TypeError, ValueError, InputUnavailable, UserError):
        return False
    return cache_key(name, spec, ctx.key_overrides(spec), deps) == record.get("cache_key")


def _keep(ctx: FigureContext, spec: dict, record: dict | None, record_path: Path
          ) -> list[Path] | None:
    """The files of the earlier complete build of this very spec (a changed spec's old files
    are not its figure), vouched for again; None when there is none."""
    if not (record and record.get("format") == FORMAT and record.get("spec") == spec):
        return None
    others = [f for f in record.get("files", []) if Path(f).name != record_path.name]
    if not others or not all((ctx.out_dir / Path(f).name).exists() for f in others):
        return None
    # Set aside when this build began (builders check their inputs before writing any file).
    # Unchanged, it is not rewritten (a rerun touches nothing; a read-only folder keeps it);
    # one set aside by an older repsim (its key under "building") gets its key back.
    kept = {**{k: v for k, v in record.items() if k != "building"},
            "cache_key": record.get("building") or record.get("cache_key")}
    if kept != record:
        paths.write_json(record_path, kept)
    return _files_here(ctx, record)


def _marker(record_path: Path) -> Path:  # there while a build may rewrite the record's files
    return record_path.with_name(f".{record_path.stem}.building")


def _set_aside(record_path: Path, record: dict | None) -> None:
    """Until the new record is written, the old one vouches for nothing: a build that stops
    after rewriting some files must not leave it passing for complete. It stays untouched,
    beside a marker (:func:`_marker`), so a run stopped while looking at a kept figure's
    inputs does not lose that build (:func:`build_all` takes the marker away)."""
    if not (record or {}).get("building") and not (record or {}).get("cache_key"):
        record_path.unlink(missing_ok=True)
    else:  # a folder that takes no marker takes none of the build's files either
        with suppress(OSError):
            paths.write_text(_marker(record_path), "")


def _read_record(path: Path) -> dict | None:
    """The record at ``path``; None when none, or no record (not JSON, or ``[1]``, say)."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _clash(folder: Path, out: Path, name: str, files: list, names: set[str]
           ) -> tuple[str, str] | None:
    """``(other spec, one line)`` when one of spec ``name``'s ``files`` is named as the figure
    of another spec in ``folder`` (``locality_maps.png``, the locality figure's, for
    ``locality_maps.toml``): both would pass for current, one with the other's picture."""
    for f in files if isinstance(files, list) else []:
        other = Path(f).stem if isinstance(f, str) else name
        if Path(str(f)).name == "REPORT.md":  # a full run's report, written after every figure
            return name, (f"{folder / name}.toml would write {out / 'REPORT.md'}, the report "
                          "that repsim figures writes; rename the spec")
        if other != name and other in names:
            return other, (f"{folder / other}.toml and {folder / name}.toml would both write "
                           f"{out / Path(f).name}; rename one of them (a spec's name is that "
                           "of its files)")
    return None


def _disown(folder: Path, ctx: FigureContext, status: str, entry: dict, names: set[str]
            ) -> tuple[str, dict]:
    """A figure just built that wrote another spec's file fails, and the other's record goes:
    its file holds this figure's picture now, so it is built again (later in this run: its
    name sorts after this one's, or in the next)."""
    clash = _clash(folder, ctx.out_dir, entry["name"], entry.get("files") or [], names)
    if status != "built" or clash is None:
        return status, entry
    for n in (entry["name"], clash[0]):
        (ctx.out_dir / f"{n}.json").unlink(missing_ok=True)
    return "failed", {"name": entry["name"], "kind": entry["kind"], "reason": clash[1]}


def _build_one(name: str, spec: dict, ctx: FigureContext) -> tuple[str, dict]:
    """``(status, summary entry)`` for one spec: cached, built, kept, skipped or failed."""
    from repsim.evaluation import hardware
    from repsim.models import resolve_device

    ctx.name, ctx.data, ctx.deps = name, {}, None
    record_path = ctx.path(".json")
    entry = {"name": name, "kind": spec["kind"]}
    record = _read_record(record_path)
    try:
        if record and not ctx.force and _still_valid(name, spec, ctx, record):
            return "cached", {**entry, "files": [str(f) for f in _files_here(ctx, record)]}
        ctx.log(f"build   {name} ({spec['kind']})")
        ctx.deps = {}
        _set_aside(record_path, record)
        files = KINDS[spec["kind"]].builder()(spec, ctx)
    except InputUnavailable as exc:
        kept = _keep(ctx, spec, record, record_path)
        if kept:  # built where its inputs were: keep that build rather than lose it
            other = other_settings(ctx, spec, record)
            return "kept", {**entry, "files": [str(f) for f in kept], "reason": str(exc),
                            **({"settings": other} if other else {}),
                            "changed": changed_weights(ctx, record),
                            "images_changed": changed_images(ctx, record)}
        if not (record and record.get("spec") != spec):  # else set aside: the spec put back
            record_path.unlink(missing_ok=True)          # keeps that build (see _keep)
        return "skipped", {**entry, "reason": str(exc)}
    except (UserError, ValueError, OSError) as exc:  # OSError: a folder it may not write
        with suppress(OSError):  # ... where the old record, like its files, stays as it was
            record_path.unlink(missing_ok=True)
        return "failed", {**entry, "reason": os_problem(exc) if isinstance(exc, OSError)
                          else str(exc)}
    except Exception as exc:  # a bug (in a user's kind, say): this figure only, with its trace
        import traceback

        record_path.unlink(missing_ok=True)
        return "failed", {**entry, "reason": f"{type(exc).__name__}: {exc} (a bug? the "
                          "traceback is in the summary: repsim figures --json)",
                          "traceback": traceback.format_exc()}
    files = [str(f) for f in files] + [str(record_path)]
    data = jsonable(ctx.data)
    try:
        json.dumps(data)
    except TypeError as exc:  # a registered kind's data; no record: the files vouch for nothing
        record_path.unlink(missing_ok=True)
        return "failed", {**entry, "reason": f"{name}: its data is not JSON ({exc}); a builder "
                          "puts numbers, strings, lists and tables in ctx.data"}
    paths.write_json(record_path, {  # last: its presence with this key means "complete"
        "format": FORMAT, "name": name, "kind": spec["kind"], "title": spec.get("title"),
        # The overrides that changed its inputs: not the data root, a path of this machine
        "spec": spec, "overrides": ctx.key_overrides(spec), "deps": ctx.deps,
        "files": [Path(f).name for f in files],  # by name: where they lie is no part of them
        "cache_key": cache_key(name, spec, ctx.key_overrides(spec), ctx.deps),
        "data": data,
        "versions": compare.versions(), "hardware": hardware(resolve_device(ctx.device))})
    return "built", {**entry, "files": files}


def summary_text(summary: dict) -> str:
    """What ``repsim figures`` prints of :func:`build_all`'s ``summary`` (see
    :func:`repsim.figures.report.summary_text`)."""
    from repsim.figures import report

    return report.summary_text(summary)


@contextmanager
def _one_run_at_a_time(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold ``out`` for this run: two runs at once would build the same figures twice and
    interleave their files, so that with other settings a record could vouch for a picture
    of the other run's. Another run waits (saying so), then finds its figures current. A
    folder where no lock can be made (read-only) is not held: each figure that needs
    writing fails in one line."""
    where = out / ".figures"
    out.mkdir(parents=True, exist_ok=True)  # a file in the way: one line before any figure
    with ExitStack() as stack:
        if paths.locked(where):
            log(f"waiting for another repsim figures writing {out} to finish")
        try:
            stack.enter_context(paths.lock(where))
        except OSError:
            pass
        yield


def build_all(analyses: str | os.PathLike = "analyses", out: str | os.PathLike = "figures",
              only: list[str] | None = None, overrides: dict | None = None,
              device: str | None = None, force: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict:
    """Build every spec in ``analyses`` into ``out``; one figure's problem never stops the
    others. Returns ``{"out", "built", "cached", "kept", "skipped", "failed", "seconds"}``:
    lists of entries with their files, or (kept, skipped, failed) the one-line reason; and
    ``report`` (a full run's REPORT.md) or ``report_stale`` (one that a run of ``only`` some
    specs left describing their earlier builds)."""
    t0 = time.perf_counter()
    specs, folder = load_specs(analyses, only), Path(analyses)
    names = {p.stem for p in folder.glob("*.toml")}
    for n in sorted(names):  # a spec named as a file of another's earlier build: before any
        clash = _clash(folder, Path(out), n, (_read_record(Path(out) / f"{n}.json") or {})
                       .get("files") or [], names)
        if clash:
            raise UserError(clash[1])
    ctx = FigureContext(Path(out), overrides, force, progress, log, device=device)
    summary: dict[str, Any] = {"out": str(Path(out)), "built": [], "cached": [], "kept": [],
                               "skipped": [], "failed": []}
    from repsim.figures.report import kept_note, write_report

    with _one_run_at_a_time(Path(out), ctx.log):
        for name, spec in specs.items():
            status, entry = _disown(folder, ctx, *_build_one(name, spec, ctx), names)
            # Returned: its record says what its files are now (a skipped build of another
            # spec stays set aside: the spec put back keeps it, see _keep).
            if status != "skipped" or not ctx.path(".json").exists():
                with suppress(OSError):
                    _marker(ctx.path(".json")).unlink(missing_ok=True)
            summary[status].append(entry)
            ctx.log(f"{status:8s}{name}" + (" (reason in the summary)" if "reason" in entry
                                             else "") + kept_note(entry))
        if not only:  # the report covers every spec, so only a full run rewrites it
            summary["report"] = str(write_report(out, list(specs), summary))
        elif (summary["built"] or summary["failed"]) and (Path(out) / "REPORT.md").is_file():
            summary["report_stale"] = str(Path(out) / "REPORT.md")  # captions of old data
    summary["seconds"] = time.perf_counter() - t0
    return summary
