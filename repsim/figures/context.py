"""What a figure builder sees (:class:`FigureContext`): settings, tracked inputs, outputs.

Every input read through the context is computed once per run and recorded for the figure's
cache key by a fingerprint of its content (sha256 of weights, probe images, manifest), never
a path, so committed figures are checked in seconds on a fresh clone, extracting nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from repsim import compare, paths
from repsim.checkpoints import entry_file
from repsim.compare import InputUnavailable, ProbeSpec
from repsim.errors import UserError
from repsim.weights import checkpoint_dir, sha256_file

_FRACTION_RE = re.compile(r"frac(?:tion)?[_-]?([0-9]*\.?[0-9]+)")
# A CKA result's per-cell fields (rows: A's layers), transposed with the matrix
CELLS = ("matrix", "se", "biased_null_mean", "p_value", "null_mean", "null_q95", "influence",
         "seed_sd")


@dataclass(frozen=True)
class ModelRef:
    """A model in a spec: registry name, weights (None: its own; 'random'; a file, relative
    to the checkpoint folder unless absolute), display label, layers."""

    model: str
    weights: str | list[str] | None = None  # a list: seeds of one recipe (repsim.seeds)
    label: str | None = None
    layers: str | None = None

    def display(self) -> str:
        if self.label:
            return self.label
        if isinstance(self.weights, list):
            return f"{self.model} ({len(self.weights)} seeds)"
        return self.model + (f" ({Path(self.weights).stem})" if self.weights else "")

    def seeds(self) -> list[ModelRef]:
        """One reference per weights file (itself unless ``weights`` is a list)."""
        if not isinstance(self.weights, list):
            return [self]
        return [replace(self, weights=w, label=None) for w in self.weights]


def same_layer_cka(res: dict) -> tuple[list[str], list, list]:
    """``(layers, cka, se)``: the layers on both sides of a CKA result, each one's CKA with
    the same layer of the other side, and its SE (None without)."""
    layers = [n for n in res["layers_a"] if n in res["layers_b"]]
    ij = [(res["layers_a"].index(n), res["layers_b"].index(n)) for n in layers]
    se = res.get("se")
    return (layers, [res["matrix"][i][j] for i, j in ij],
            [se[i][j] if se else None for i, j in ij])


def weights_path(weights: str | None) -> str | None:
    """A spec's weights as ``load_model`` takes them: relative files in the checkpoint folder."""
    if isinstance(weights, list):
        raise UserError(f"weights={weights!r} lists seeds, but this figure reads one model; "
                        f"give one file, e.g. weights={weights[0]!r}")
    if weights in (None, "random") or Path(weights).is_absolute():
        return weights
    return str(checkpoint_dir() / weights)


def check_weights(ref: ModelRef) -> None:
    """InputUnavailable when ``ref``'s weights cannot be had here."""
    from repsim.models import weights_problem

    problem = weights_problem(ref.model, weights_path(ref.weights))
    if problem:
        raise InputUnavailable(problem)


def weights_file(ref: ModelRef) -> Path | None:
    """The weights file behind ``ref`` (its own, or the model's default file); None for
    random or pretrained weights. A run's manifest entry is named by this file's stem."""
    from repsim.registry import default_weights_file, get_spec

    if isinstance(ref.weights, list):  # only CKA kinds average over seeds
        raise UserError(f"model entry weights={ref.weights!r} lists seeds, but this figure "
                        f"reads one {ref.model} model; give one file, e.g. "
                        f"weights={ref.weights[0]!r}")
    if ref.weights is None:
        return default_weights_file(get_spec(ref.model))
    return None if ref.weights == "random" else Path(weights_path(ref.weights))


class FigureContext:
    """What a builder sees: settings, tracked inputs (memoised for the run), where to write;
    the current figure's ``name``, ``data`` and ``deps`` (description -> fingerprint)."""

    def __init__(self, out_dir: Path, overrides: dict | None = None, force: bool = False,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 device: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        valid = [f.name for f in fields(ProbeSpec) if f.name not in ("data_root", "device")]
        unknown = sorted(set(self.overrides) - {*valid, "data_root"})
        if unknown:  # else an AttributeError from deep inside the first figure's key
            raise UserError(f"overrides keys {unknown} are unknown; valid: "
                            f"{', '.join(valid)}, data_root")
        self.device = device  # where to extract and compute; not part of any cache key
        self.force, self.progress = force, progress
        self.log = log or (lambda msg: None)
        self.name = ""
        self.data: dict = {}
        self.deps: dict[str, Any] | None = None
        self._values: dict[str, Any] = {}
        self._hashes: dict[tuple, str] = {}

    # ----------------------------------------------------------------- settings

    def probe_spec(self, spec: dict) -> ProbeSpec:
        """The spec's ``[probe]`` with the command line's overrides applied, but not the data
        root: where the images are read from is no part of which images they are (their
        fingerprint is their content), so it joins only when they are loaded."""
        return ProbeSpec(**{**(spec.get("probe") or {}), **self.key_overrides(spec)})

    def key_overrides(self, spec: dict) -> dict:
        """The overrides that change what ``spec`` reads (for its cache key): not the data
        root, nor one equal to the spec's own setting, nor a seed where the whole split is
        read (as the probe set's provenance records it)."""
        own = ProbeSpec(**(spec.get("probe") or {}))
        changed = {k: v for k, v in self.overrides.items()
                   if k != "data_root" and getattr(own, k) != v}
        if changed.get("n", own.n) is None:  # every image: a subset seed picks nothing
            changed.pop("seed", None)
        return changed

    def cka_settings(self, spec: dict) -> dict:
        from repsim.sketch import DEFAULT_BATCH_SIZE, DEFAULT_ESTIMATOR

        c = {"kernel": "linear", "estimator": DEFAULT_ESTIMATOR, "batch_size": None,
             "batch_seed": 0, "threshold": 1.0, "permutations": 0, **(spec.get("cka") or {})}
        mini = c["estimator"] == "minibatch"
        # None only means the default: a 0 given goes to the engine, which refuses it.
        batch = DEFAULT_BATCH_SIZE if c.get("batch_size") is None else c["batch_size"]
        c["batch_size"] = batch if mini else None
        return c

    def positive_int(self, spec: dict, key: str, default: int) -> int:
        """The spec's ``key`` (else ``default``), which must be a positive integer: a float, a
        string or a boolean is refused, not coerced (``int(2.7)`` is 2, ``int(True)`` 1)."""
        v = spec.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{self.name}: {key}={v!r} must be a positive integer; fix the file")
        return v

    def names(self, spec: dict, key: str, what: str, example: str, numbers: bool = False
              ) -> str | list | None:
        """The spec's ``key`` (None when absent): a string or a list of strings (with ``numbers``,
        integers too), else refused by name: it would fail deep inside, where nothing names it."""
        v = spec.get(key)
        kinds = (str, int) if numbers else str
        items = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(x, kinds) and not isinstance(x, bool)
                                     for x in items):
            raise UserError(f"{self.name}: {key}={v!r} must be {what}: a string or a list of "
                            f"them, e.g. {key} = {example}; fix the file")
        return [v] if isinstance(v, int) else v  # a bool was refused above

    def model_ref(self, item: str | dict, spec: dict | None = None) -> ModelRef:
        """A ``models`` entry (name or table) as a :class:`ModelRef`; ``[labels]`` apply."""
        item = {"model": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "model" not in item:
            raise UserError(f"{self.name}: model entry {item!r} is neither a name nor a table "
                            "with a 'model' key")
        keys = [f.name for f in fields(ModelRef)]
        extra = set(item) - set(keys)
        if extra:
            raise UserError(f"{self.name}: model entry keys {sorted(extra)} are unknown; "
                            f"valid: {', '.join(keys)}")
        for k, v in item.items():
            seeds = k == "weights" and isinstance(v, list) and v
            if not isinstance(v, str) and not (seeds and all(isinstance(w, str) for w in v)):
                what = "a file name or a list of them (seeds)" if k == "weights" else "a string"
                raise UserError(f"{self.name}: model entry {k}={v!r} must be {what}")
        label = item.get("label") or ((spec or {}).get("labels") or {}).get(item["model"])
        if not isinstance(label, (str, type(None))):
            raise UserError(f"{self.name}: [labels] {item['model']}={label!r} must be a string")
        return ModelRef(**{**item, "label": label})

    # ----------------------------------------------------------------- tracked inputs

    def store(self, ref: ModelRef, probe: ProbeSpec):
        """The activation store (:class:`repsim.compare.StoreRef`) of ``ref`` on ``probe``
        (of its first seed; every seed's store is made)."""
        return [self._need({"type": "store", "ref": asdict(r), "probe": asdict(probe)})
                for r in ref.seeds()][0]

    def layer_store(self, ref: ModelRef, probe: ProbeSpec) -> tuple[Any, list[str]]:
        """``(store, layer names)`` of ``ref``'s layers: its default store when that holds
        them, else a store of exactly those (made once). Call :meth:`store` first: this one
        is not tracked, the inputs being the same."""
        settings = dict(probe=self._probe(asdict(probe)), progress=self.progress, log=self.log)
        return compare.resolve_input(ref.model, weights_path(ref.weights), ref.layers,
                                     ref.display(), False, settings)

    def cka(self, a: ModelRef, b: ModelRef, probe: ProbeSpec, settings: dict) -> dict:
        """CKA result dict (as ``repsim cka`` writes it) with rows = ``a``'s layers; each
        unordered pair is computed once and transposed on demand. Seeds (a list of weights)
        give the mean over every seed pair, with ``seed_sd`` (:func:`repsim.seeds.aggregate`)."""
        # Any list is seeds, one file too (a recipe's first seed): a list names no one file.
        if isinstance(a.weights, list) or isinstance(b.weights, list):
            from repsim.seeds import aggregate

            runs = [self.cka(x, y, probe, settings) for x in a.seeds() for y in b.seeds()]
            per_run = {k: None for k in CELLS}  # a single comparison's, not the mean's
            return {**runs[0], **per_run, **aggregate(runs), "model_a": a.display(),
                    "model_b": b.display()}
        ka, kb = (json.dumps(asdict(r), sort_keys=True) for r in (a, b))
        first, second = (a, b) if ka <= kb else (b, a)
        res = self._need({"type": "cka", "a": asdict(first), "b": asdict(second),
                          "probe": asdict(probe), "cka": settings})
        if (first, second) == (a, b):
            return res
        flip = {k: res[k[:-1] + ("b" if k.endswith("_a") else "a")]
                for k in res if k.endswith(("_a", "_b"))}  # model_a <-> model_b, ...
        cells = {k: [list(col) for col in zip(*res[k])] for k in CELLS if res.get(k)}
        sides = res.get("inputs")  # each side's store, weights and sha256
        if isinstance(sides, dict) and {"a", "b"} <= set(sides):
            flip["inputs"] = {**sides, "a": sides["b"], "b": sides["a"]}
        return {**res, **flip, **cells}

    def model(self, ref: ModelRef):
        """``(model, provenance)`` on CPU; weights paths in the provenance are relative to
        the checkpoint folder when inside it."""
        return self._need({"type": "model", "ref": asdict(ref)})

    def images(self, probe: ProbeSpec):
        """The :class:`repsim.data.ProbeSet` of ``probe``."""
        return self._need({"type": "images", "probe": asdict(probe)})

    def manifest(self) -> dict | None:
        """``checkpoints/manifest.json`` parsed, or None when there is none."""
        return self._need({"type": "manifest"})

    @property
    def manifest_path(self) -> Path:
        return checkpoint_dir() / "manifest.json"

    def checkpoints(self, base: str, pattern: str) -> list[dict]:
        """Checkpoints of model ``base`` whose name matches ``pattern``, by fraction: dicts
        with name, file (relative to the checkpoint folder), train_fraction, manifest entry."""
        return self._need({"type": "checkpoints", "base": base, "pattern": pattern})

    def _need(self, desc: dict) -> Any:
        fingerprint = self.fingerprint(desc)
        if self.deps is not None:
            self.deps[json.dumps(desc, sort_keys=True)] = fingerprint
        return self._value(desc)

    def _value(self, desc: dict) -> Any:
        """The input ``desc`` from ``self._load_<type>``, once per run (an unavailable input
        is asked about once, not once per figure)."""
        key = json.dumps(desc, sort_keys=True)
        if key not in self._values:
            try:
                self._values[key] = getattr(self, "_load_" + desc["type"])(desc)
            except InputUnavailable as exc:
                self._values[key] = exc
        if isinstance(self._values[key], InputUnavailable):
            raise self._values[key]
        return self._values[key]

    def fingerprint(self, desc: dict) -> Any:
        """What decides the input ``desc``, by content: each model's weights (sha256 of the
        file, 'random', or the registry's pretrained source), the probe images' sha256, the
        manifest's sha256 (and its entries of other bytes than their files here, if any).
        Cheap: nothing is extracted or computed."""
        kind = desc["type"]
        if kind == "manifest":
            path = self.manifest_path
            if not path.is_file():
                return None
            # Its entries' numbers are of their files' bytes: an entry of another version of
            # its file here changes the key (and the print, only then: agreeing keys hold).
            stale = self._stale_entries()
            return {"sha256": self._sha256(path), "stale": stale} if stale else self._sha256(path)
        if kind == "checkpoints":
            return {"manifest": self.fingerprint({"type": "manifest"}),
                    "files": [(c["name"], c["train_fraction"],
                               self._sha256(checkpoint_dir() / c["file"]))
                              for c in self._value(desc)]}
        if kind == "images":
            ps = self._value(desc)
            return {**{k: v for k, v in ps.provenance().items() if k != "source"},
                    "images_sha256": hashlib.sha256(ps.images.tobytes()).hexdigest()}
        if kind not in ("store", "cka", "model"):
            raise KeyError(kind)
        out = {side: self._weights_print(ModelRef(**desc[side]))
               for side in ("ref", "a", "b") if side in desc}
        if "probe" in desc:
            out["images"] = self.fingerprint({"type": "images", "probe": desc["probe"]})
        return out

    def _weights_print(self, ref: ModelRef) -> str | None:
        from repsim.registry import canonical_name, get_spec, preprocessing_info, user_architecture

        # A registered model's code may change under its name while the file still loads (a
        # layer without parameters added), and so may its preprocessing (mean, std, input
        # size), which its stores' keys hold: either makes the same file another model.
        arch = user_architecture(ref.model)
        user = "" if arch is None else (
            f"@{arch}+{paths.digest(preprocessing_info(get_spec(ref.model)))[:12]}")
        name = canonical_name(ref.model) if arch is None else ref.model + user
        if ref.weights == "random":  # a user's model: random weights of its architecture
            return ref.weights if name == ref.model else f"random:{name}"
        path = weights_file(ref)
        if path is None:  # pretrained: fixed by the name, once timm:<arch> has its default tag
            return get_spec(ref.model).default_weights if name == ref.model else name
        if not path.is_file():
            check_weights(ref)  # with its reason, when there is one
            raise InputUnavailable(f"weights file {path} does not exist")
        return self._sha256(path) + user

    def stale(self, entry: dict | None) -> str | None:
        """Why the manifest ``entry`` is not of its checkpoint file here: the file holds other
        bytes than the sha256 it lists (a run killed between writing the two, a file replaced
        by hand), so its accuracy and epochs are another version's; None when it agrees, lists
        no sha256 (taken as it says) or its file is not here (nothing to check)."""
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str):
            return None
        path = checkpoint_dir() / entry_file(entry)
        now = self._sha256(path) if path.is_file() else sha
        if now == sha:
            return None
        return (f"the manifest lists {path.name} with sha256 {sha[:12]}, but the file "
                f"here is {now[:12]}: its accuracy and epochs are of another "
                "version of the file; fix: rerun the file's training command (it rewrites "
                "the entry)")

    def _stale_entries(self) -> dict[str, str]:
        """name -> the file's sha256, for each manifest entry :meth:`stale` refuses."""
        try:
            rows = (self._value({"type": "manifest"}) or {}).get("checkpoints", [])
        except UserError:  # its load says why
            return {}
        return {str(e.get("name")): self._sha256(checkpoint_dir() / entry_file(e))
                for e in rows if self.stale(e)}

    def _sha256(self, path: Path) -> str:
        """The file's sha256, hashed once per run while its size and mtime hold."""
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]

    def _probe(self, d: dict) -> ProbeSpec:
        """A probe from an input description, set to run on this run's device."""
        return ProbeSpec(**{**d, "data_root": self.overrides.get("data_root"),
                            "device": self.device})

    def _load_store(self, d: dict):
        ref = ModelRef(**d["ref"])
        return compare.resolve_store(ref.model, weights=weights_path(ref.weights),
                                     probe=self._probe(d["probe"]), label=ref.display(),
                                     force=self.force, progress=self.progress, log=self.log)

    def _load_cka(self, d: dict) -> dict:
        probe = self._probe(d["probe"])
        refs = ModelRef(**d["a"]), ModelRef(**d["b"])
        for r in refs:  # before extracting either side: B's weights may be missing
            check_weights(r)
        for r in refs:  # the default stores, extracted once per run (force applies here)
            self._value({"type": "store", "ref": asdict(r), "probe": d["probe"]})
        # ... or stores of exactly the requested layers when the default ones lack them
        sides = [self.layer_store(r, ProbeSpec(**d["probe"])) for r in refs]
        layers = [None if r.layers is None else ",".join(names)
                  for r, (_, names) in zip(refs, sides)]
        # The spec's default batch seed (0) is no seed given: run_cka refuses an idle one.
        cka = {**d["cka"], "batch_seed": d["cka"].get("batch_seed") or None}
        cfg = compare.CKAConfig(
            a=str(sides[0][0].path), b=str(sides[1][0].path), label_a=refs[0].display(),
            label_b=refs[1].display(), layers_a=layers[0], layers_b=layers[1], **cka,
            probe=probe, plots=False, out=str(paths.cache_dir("cka") / probe.tag()),
            force=self.force, device=probe.device, progress=self.progress, log=self.log)
        return compare.run_cka(cfg)["result"]

    def _load_model(self, d: dict):
        from repsim import models

        ref = ModelRef(**d["ref"])
        check_weights(ref)
        model, prov = models.load_model(ref.model, weights_path(ref.weights))
        with suppress(ValueError):  # a committed figure names no folder of its machine
            prov["weights"] = Path(prov["weights"]).relative_to(checkpoint_dir()).as_posix()
        return model, prov

    def _load_images(self, d: dict):
        from repsim.data import load_probe_set

        p = self._probe(d["probe"])
        return load_probe_set(p.dataset, p.split, n=p.n, seed=p.seed, data_root=p.data_root,
                              progress=self.progress)

    def _load_manifest(self, d: dict) -> dict | None:
        path = self.manifest_path
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_bytes())
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
            raise UserError(f"{path} has no 'checkpoints' list; see the README for its schema")
        for e in data["checkpoints"]:
            if not isinstance(e, dict):
                raise UserError(f"{path}: checkpoints entry {e!r} is not an object; see the "
                                "README for its schema")
        return data

    def _load_checkpoints(self, d: dict) -> list[dict]:
        folder, found = checkpoint_dir(), {}
        for e in (self._value({"type": "manifest"}) or {}).get("checkpoints", []):
            name, frac = str(e.get("name", "")), e.get("train_fraction")
            file = entry_file(e)
            if (fnmatch.fnmatchcase(name, d["pattern"]) and e.get("model", d["base"]) == d["base"]
                    and (folder / file).is_file() and isinstance(frac, (int, float))
                    and not isinstance(frac, bool)):
                stale = self.stale(e)  # its accuracy is not this file's
                found[name] = {"name": name, "file": file, "train_fraction": float(frac),
                               "entry": None if stale else e, "stale": stale}
        for path in sorted(folder.glob(d["pattern"] + ".pt")):  # files the manifest lacks
            m = _FRACTION_RE.search(path.stem)
            if path.stem not in found and m:
                found[path.stem] = {"name": path.stem, "file": path.name,
                                    "train_fraction": float(m.group(1)), "entry": None,
                                    "stale": None}
        return sorted(found.values(), key=lambda c: (c["train_fraction"], c["name"]))

    def drawn_images(self, spec: dict, default: int | None = 4):
        """``(probe set, images (N, H, W, 3) uint8, ids (N,))``: the spec's ``[probe]`` and the
        images drawn from it (its ``images``: the first N, else ``default``, None meaning one
        per class; or its ``ids``)."""
        from repsim.data import pick_images

        n = self.positive_int(spec, "images", 1) if "images" in spec else default
        ids = spec.get("ids")
        if ids is not None and not (isinstance(ids, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise UserError(f"{self.name}: ids={ids!r} must be a list of sample ids (integers); "
                            "fix the file")
        probe = self.images(self.probe_spec(spec))
        return (probe, *pick_images(probe, n, ids, self.overrides.get("data_root"),
                                    self.progress))

    @contextmanager
    def on_device(self, models: list) -> Iterator[list]:
        """Run ``models`` on this run's device, then back to the CPU: the context shares
        loaded models between figures."""
        from repsim.models import resolve_device

        device = resolve_device(self.device)
        try:
            yield [m.to(device) for m in models]
        finally:
            for m in models:
                m.to("cpu")

    # ----------------------------------------------------------------- outputs

    def path(self, suffix: str) -> Path:
        """``<out>/<figure name><suffix>``, e.g. ``ctx.path('.csv')``."""
        return self.out_dir / f"{self.name}{suffix}"

    def save(self, fig) -> list[Path]:
        """Write ``fig`` as ``<out>/<name>.png`` and ``.pdf``."""
        from repsim.figures import draw

        return draw.save(fig, self.out_dir / self.name)

    def write_text(self, suffix: str, text: str) -> Path:
        return paths.write_text(self.path(suffix), text)
