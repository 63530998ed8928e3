"""A run's files: float16 weights, the manifest beside them, snapshots and the epoch log.

``<dir>/<name>.pt`` is listed in ``<dir>/manifest.json``; snapshots (``--snapshots``) are
``<dir>/<name>_snapshots/epoch<E>.pt`` in the checkpoint's format, listed in that folder's
``index.json`` and under ``snapshots`` in the manifest entry (the ``dynamics`` figure's input);
the run directory's ``log.jsonl`` holds a JSON row per epoch.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim import paths
from repsim.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn


def half(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's weights: float16 on the CPU (halves the file; loading casts back)."""
    import torch

    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.cpu())
            for k, v in model.state_dict().items()}


def manifest_path(ckpt_path: Path) -> Path:
    """The ``manifest.json`` beside the checkpoint ``ckpt_path``, which lists it."""
    return ckpt_path.parent / "manifest.json"


def update_manifest(ckpt_path: Path, entry: dict[str, Any]) -> Path:
    """Insert or replace ``entry`` (by name) in the ``manifest.json`` beside the checkpoint,
    under a lock: runs training in parallel into one folder would overwrite each other's."""
    path = manifest_path(ckpt_path)
    with paths.lock(path):
        data = {"checkpoints": []}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a binary file
                raise UserError(f"{path} is not valid JSON; fix or delete it, then rerun"
                                ) from None
        rows = data.get("checkpoints", []) if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and isinstance(r.get("name"), str) for r in rows):
            raise UserError(f"{path} is not a checkpoint manifest; valid: a JSON object whose "
                            "'checkpoints' is a list of objects, each with a 'name'; fix: fix "
                            "or delete it, then rerun")
        rows = [r for r in rows if r.get("name") != entry["name"]]
        data["checkpoints"] = sorted([*rows, entry], key=lambda r: r["name"])
        return paths.write_text(path, json.dumps(data, indent=2) + "\n")


def entry_file(entry: dict[str, Any]) -> str:
    """The checkpoint file a manifest entry lists, relative to the manifest's folder: its
    ``file``, else ``<name>.pt`` (entries written before files were recorded)."""
    return str(entry.get("file", f"{entry.get('name')}.pt"))


def manifest_entry(ckpt_path: Path) -> dict[str, Any] | None:
    """The entry of the manifest beside ``ckpt_path`` that lists that file; None where there is
    none or no readable manifest (:func:`update_manifest` says why when it next writes)."""
    try:
        rows = json.loads(manifest_path(ckpt_path).read_text())["checkpoints"]
        return next(r for r in rows if isinstance(r, dict) and ckpt_path.name == entry_file(r))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def listed(ckpt_path: Path, sha256: str | None = None) -> bool:
    """Whether the checkpoint ``ckpt_path`` (of ``sha256``, when known) exists and the manifest
    beside it lists these very bytes. A run killed between writing the checkpoint and its
    entry leaves none, or its previous version's (other epochs and metrics)."""
    from repsim.weights import sha256_file

    entry = manifest_entry(ckpt_path)
    return (entry is not None and ckpt_path.is_file()
            and entry.get("sha256") == (sha256 or sha256_file(ckpt_path)))


# --------------------------------------------------------------------------- the run's log


@contextmanager
def hold_run(run_dir: Path, out: Path | None = None) -> Iterator[None]:
    """Hold ``run_dir`` and the checkpoint ``out`` for this process: two processes on one run
    (the same command twice, or restart=True beside a running one) would overwrite each
    other's state and log rows, and two runs given one out= each other's checkpoint (and a
    fresh start deletes the other's snapshots)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded, as paths.lock
        yield
        return
    held = [(run_dir, run_dir / "state.pt.lock",  # paths.lock's files: released on exit
             f"run {run_dir} is being trained by another process; valid: one process per "
             "run; fix: wait for it to end, or out=PATH and run_dir=PATH both new for a "
             "separate run")]
    if out is not None:
        held.append((out.parent, Path(f"{out}.lock"), f"out={out} is being written by another "
                     "run; valid: one run per out; fix: wait for it to end, or another out=PATH"))
    with ExitStack() as files:
        made: list[Path] = []  # folders this call made: removed again when refused
        locks = [lock_file for _, lock_file, _ in held]
        for folder, lock_file, busy in held:
            made += [] if folder.exists() else [folder]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                f = files.enter_context(open(lock_file, "a"))
            except OSError as exc:  # a file of that name, no permission
                _unmake(made, locks)
                what = f"run_dir={run_dir}" if folder == run_dir else f"out={out}"
                raise UserError(f"{what} cannot hold the run's files ({exc.strerror}); "
                                f"fix: another {what.split('=')[0]}=PATH") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                files.close()
                _unmake(made, locks)
                raise UserError(busy) from None
        try:
            yield
        except BaseException:  # refused before any work (bad settings): leave no new folder
            files.close()
            _unmake(made, locks)
            raise


def _unmake(made: list[Path], locks: list[Path]) -> None:
    """Remove each folder of ``made`` that holds nothing but some of the ``locks`` (one folder
    may hold both: out=DIR/m.pt with run_dir=DIR)."""
    for folder in made:
        inside = set(folder.iterdir()) if folder.is_dir() else None
        if inside is not None and inside <= set(locks):
            for lock_file in inside:
                lock_file.unlink()
            folder.rmdir()


def read_state(state_path: Path, out: Path) -> dict[str, Any]:
    """The resumable state of a run whose checkpoint is ``out``; UserError for torn or foreign
    bytes, with advice about the run (not about a weights file)."""
    import torch

    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        why = None if isinstance(state, dict) else f"a {type(state).__name__}, not a dict"
    except Exception as exc:  # torn or foreign bytes: zip, EOF and unpickling errors
        why = type(exc).__name__
    if why:
        raise UserError(f"{state_path}, the saved state of this run, is unreadable ({why}); "
                        "valid: a state written by repsim train; fix: restart=True to start "
                        f"over (replacing it and {out}), or another run_dir=PATH")
    return state


def check_state(state: dict[str, Any], state_path: Path, device: str, precision: str,
                init: str, init_sha256: str | None) -> None:
    """UserError where the saved ``state`` cannot go on here: saved on another ``device``
    type, trained in another ``precision``, or started from other bytes of the file
    ``init`` than ``init_sha256`` (states before these were recorded: not checked)."""
    fix = "fix: restart=True to start over, or another run_dir=PATH"
    rng = state["rng"]  # states before "device" was recorded: cuda or cpu
    saved_on = "cuda" if rng.get("cuda") is not None else rng.get("device", "cpu")
    if saved_on != device:  # generator states of one device type fit no other
        raise UserError(f"{state_path} was saved on {saved_on} and cannot continue on "
                        f"{device}; valid: device={saved_on} to resume; {fix}")
    saved_in = state.get("precision", precision)
    if saved_in != precision:  # another autocast from here on: not an uninterrupted run's end
        raise UserError(f"{state_path} was trained in {saved_in} and cannot continue in "
                        f"{precision}; valid: precision={saved_in} to resume; {fix}")
    began = state.get("init_sha256", init_sha256)
    if began != init_sha256:  # the checkpoint would name a start the run never had
        raise UserError(f"{state_path} started from other bytes of {init} (sha256 "
                        f"{str(began)[:12]}, now {str(init_sha256)[:12]}); valid: the start "
                        f"file as it was, to resume; {fix}")


def train_data_record(images: Any, labels: Any) -> dict[str, Any]:
    """The fingerprint of a run's training images ``(N, H, W, 3)`` uint8 and labels ``(N,)``:
    ``n`` and the sha256 of the pixels and the labels as little-endian int64 (0.14 s for
    CIFAR-10's 50,000, once a session; ids alone miss a file replaced under the same name)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).data)
    h.update(np.asarray(labels).astype("<i8").tobytes())
    return {"n": len(labels), "sha256": h.hexdigest()}


def check_train_data(state: dict[str, Any], state_path: Path, now: dict[str, Any]) -> None:
    """UserError where the saved ``state`` was trained on other images or labels than ``now``
    (a :func:`train_data_record`); states before it was recorded: not checked."""
    saved = state.get("train_data", now)
    if saved == now:
        return
    what = (f"{saved['n']} images, now {now['n']}" if saved["n"] != now["n"] else
            f"{now['n']} images as before, other pixels or labels: sha256 "
            f"{saved['sha256'][:12]}, now {now['sha256'][:12]}")
    raise UserError(f"{state_path} was trained on other training images ({what}); valid: the "
                    "training data as it was, to resume; fix: restart=True to start over, or "
                    "another run_dir=PATH")


def get_rng(gen: torch.Generator, dev: torch.device) -> dict[str, Any]:
    """The random states a resumed run needs: ``gen`` (data order, augmentation) and torch's
    CPU and, on CUDA or MPS, device generators (dropout); ``device``: the type they fit."""
    import torch

    return {"data": gen.get_state(), "torch": torch.get_rng_state(), "device": dev.type,
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            **({"mps": torch.mps.get_rng_state()} if dev.type == "mps" else {})}


def set_rng(rng: dict[str, Any], gen: torch.Generator, dev: torch.device) -> None:
    """Restore the states :func:`get_rng` saved (:func:`check_state` checked the device)."""
    import torch

    gen.set_state(rng["data"])
    torch.set_rng_state(rng["torch"])
    if dev.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], dev)
    if dev.type == "mps" and rng.get("mps") is not None:
        torch.mps.set_rng_state(rng["mps"])


def other_settings(saved: Any, now: dict[str, Any], state_path: Path, out: Path) -> UserError:
    """The refusal to resume the run of ``state_path``, whose identity ``saved`` is not
    ``now``: it names the settings that differ."""
    differ = _differing_settings(saved, now)
    return UserError(f"{state_path} belongs to a run with other settings"
                     f"{f' ({differ})' if differ else ''}; valid: the same settings as before "
                     "to resume; fix: restart=True to start over (replacing "
                     f"{out} and its snapshots), or out=PATH and run_dir=PATH both new for a "
                     "separate run")


def _differing_settings(saved: Any, now: dict[str, Any]) -> str:
    """The first three settings (a recipe's: by field) where a saved run's identity ``saved``
    and ``now`` differ, as ``"lr 0.001, now 0.0005; ..."``; "" for a ``saved`` of no identity."""
    def shown(v: Any) -> str:  # a digest or a long path: both ends
        return str(v) if len(str(v)) <= 40 else f"{str(v)[:18]}...{str(v)[-18:]}"

    if not isinstance(saved, dict):
        return ""
    diffs = []
    for key in dict.fromkeys([*saved, *now]):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):  # the recipe: the fields that differ
            diffs += [f"{key} {k} {shown(old.get(k))}, now {shown(new.get(k))}"
                      for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
        elif old != new:
            diffs.append(f"{key} differs" if isinstance(old, dict) or isinstance(new, dict)
                         else f"{key} {shown(old)}, now {shown(new)}")
    return "; ".join(diffs[:3])


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """A run's log rows, one per epoch ([] before the first save), without a torn last line:
    a run killed while an older repsim appended to its log, before the state of that epoch."""
    if not log_path.is_file():
        return []
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except ValueError:
            if i + 1 < len(lines):
                raise UserError(f"{log_path} line {i + 1} is not JSON; fix: restart=True to "
                                "start the run over, or another run_dir=PATH") from None
    return rows


def write_log(log_path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace the log with ``rows``, atomically (rewritten whole: a few hundred lines)."""
    paths.write_text(log_path, "".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- snapshots


def snapshot_epochs(spec: str | Sequence[int] | None, epochs: int) -> tuple[int, ...]:
    """The epochs to keep, sorted: ``spec`` is comma-separated epochs and ``every:K`` items
    (K, 2K, ... and the last epoch), or a sequence of epochs; 0 is the initialisation.
    ``epochs``: the run's planned epochs. None or empty: none."""
    bad = (f"snapshots={spec!r} is not a list of epochs; valid: comma-separated epochs "
           f"0..{epochs} (0: the initialisation) and every:K, e.g. 0,1,5,every:10")
    if spec is not None and not isinstance(spec, (str, Sequence)):  # 10: not every:10
        raise UserError(bad)
    if not spec:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        try:
            if text.startswith("every:"):
                k = int(text[len("every:"):])
                if k < 1:
                    raise ValueError(text)
                out.update([*range(k, epochs + 1, k), epochs])
            else:
                out.add(int(text))
        except ValueError:
            raise UserError(bad) from None
    if min(out) < 0 or max(out) > epochs:
        raise UserError(f"{bad}; {max(out) if max(out) > epochs else min(out)} is outside "
                        f"the run's 0..{epochs} (epochs={epochs})")
    return tuple(sorted(out))


def snapshot_dir(ckpt_path: Path) -> Path:
    """``<dir>/<name>_snapshots`` for the checkpoint ``<dir>/<name>.pt``."""
    return ckpt_path.parent / f"{ckpt_path.stem}_snapshots"


def snapshots(ckpt_path: Path) -> list[dict[str, Any]]:
    """The snapshots of the run whose checkpoint is ``ckpt_path``, by epoch (empty: none)."""
    index = snapshot_dir(ckpt_path) / "index.json"
    if not index.is_file():
        return []
    try:
        rows = json.loads(index.read_text())["snapshots"]
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in rows):
            raise TypeError(rows)
        return rows
    except (ValueError, KeyError, TypeError):  # TypeError: JSON of another shape
        raise UserError(f"{index} is not a snapshot index; delete it (and restart=True "
                        "the run) to start the snapshots over") from None


def save_snapshot(ckpt_path: Path, epoch: int, state_dict: dict[str, torch.Tensor],
                  test: dict[str, float], meta: dict[str, Any],
                  row: dict[str, Any] | None = None) -> None:
    """Write the snapshot of ``epoch`` and add it to the index.
    ``state_dict``: float16 weights; ``test``: their test ``accuracy`` (%) and ``loss``
    (nats); ``meta``: provenance; ``row``: the epoch's log row, None for the initialisation."""
    import torch

    from repsim.weights import sha256_file

    folder = snapshot_dir(ckpt_path)
    path = folder / f"epoch{epoch}.pt"
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
               **{k: (row or {}).get(k) for k in ("train_accuracy", "train_loss")}}
    paths.atomic_write(path, lambda tmp: torch.save(
        {"state_dict": state_dict, **meta, "epochs": epoch, **metrics}, tmp))
    entry = {"epoch": epoch, "file": path.relative_to(ckpt_path.parent).as_posix(),
             "sha256": sha256_file(path), **metrics}
    rows = sorted([*(r for r in snapshots(ckpt_path) if r["epoch"] != epoch), entry],
                  key=lambda r: r["epoch"])
    paths.write_json(folder / "index.json", {"checkpoint": ckpt_path.name, "snapshots": rows})


def warn_of_lost_snapshots(ckpt_path: Path, epochs: Sequence[int], start_epoch: int,
                           name: str) -> None:
    """Warn of snapshot ``epochs`` that the run ``name`` resumed (or finished) at
    ``start_epoch`` has passed without keeping them: no later save can make them."""
    kept = {s["epoch"] for s in snapshots(ckpt_path)}
    lost = [e for e in epochs if e <= start_epoch and e not in kept]
    if start_epoch and lost:
        warnings.warn(f"snapshots at epochs {', '.join(map(str, lost))} cannot be made: "
                      f"{name} had trained to epoch {start_epoch} without keeping them; "
                      "fix: restart=True to train it again from scratch and keep them",
                      stacklevel=3)


def clear_snapshots(ckpt_path: Path) -> None:
    """Remove the run's snapshot folder (a restarted run's snapshots belong to another)."""
    shutil.rmtree(snapshot_dir(ckpt_path), ignore_errors=True)
