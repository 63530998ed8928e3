"""What ``repsim figures`` says of a kept figure (one built where its inputs were, its record
brought here): the probe settings, weights and probe images it read that are not this run's
or those here. Its numbers are of what it read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from repsim.compare import InputUnavailable, ProbeSpec
from repsim.errors import UserError
from repsim.figures.context import FigureContext, ModelRef, weights_file

PROBE_KEYS = tuple(f.name for f in fields(ProbeSpec) if f.name not in ("data_root", "device"))


def record_deps(record: dict) -> Iterator[tuple[dict, Any]]:
    """A record's inputs as ``(description, fingerprint then)``; a key that is no JSON object
    (a hand-edited record) is none."""
    for key, then in (record.get("deps") or {}).items():
        try:
            desc = json.loads(key)
        except ValueError:
            continue
        if isinstance(desc, dict):
            yield desc, then


def changed_weights(ctx: FigureContext, record: dict) -> list[str]:
    """For a kept build: each model it read whose weights file here is another file now (by
    sha256), in one line; its numbers are of the file it read, not of the checkpoint here."""
    out = []
    for desc, then in record_deps(record):
        if desc.get("type") not in ("store", "model") or not isinstance(then, dict):
            continue
        try:
            ref = ModelRef(**desc["ref"])
            file = weights_file(ref)
            now = ctx.fingerprint({"type": "model", "ref": desc["ref"]})["ref"]
        except (InputUnavailable, UserError, KeyError, TypeError, ValueError):
            continue  # not here (a snapshot left on the GPU machine): nothing to compare
        if file is not None and isinstance(then.get("ref"), str) and now != then["ref"]:
            # sha256[@architecture of a registered model]: say which of the two changed
            sha_then, sha_now = then["ref"].partition("@")[0], now.partition("@")[0]
            out.append(f"{ref.display()} ({file.name}: it read sha256 {sha_then[:12]}, "
                       f"here {sha_now[:12]})" if sha_then != sha_now else
                       f"{ref.display()} ({file.name}: the same file, another architecture now)")
    return list(dict.fromkeys(out))


def changed_images(ctx: FigureContext, record: dict) -> list[str]:
    """For a kept build: each probe set it read whose images here are others now (another
    copy of the data set, a re-encoded split: by sha256), in one line; its numbers are of the
    images it read, not of these."""
    out = []
    for desc, then in record_deps(record):
        try:
            then = then if desc["type"] == "images" else then.get("images")
            if not isinstance(then, dict) or not isinstance(desc.get("probe"), dict):
                continue
            now = ctx.fingerprint({"type": "images", "probe": desc["probe"]})
        except (InputUnavailable, UserError, KeyError, TypeError, ValueError, AttributeError):
            continue  # not here (no data set offline): nothing to compare
        if now != then:
            p = desc["probe"]
            out.append(f"{p.get('dataset')} {p.get('split')} (n = {p.get('n') or 'all'}: it "
                       f"read sha256 {str(then.get('images_sha256'))[:12]}, here "
                       f"{str(now.get('images_sha256'))[:12]})")
    return list(dict.fromkeys(out))


def other_settings(ctx: FigureContext, spec: dict, record: dict) -> str | None:
    """For a kept build: the probe settings it was built with, where this run's overrides
    (``--n``, ``--seed``, ...) ask others, in one line; None when the same, or it read no
    probe. Its numbers are of those settings, not of the ones asked."""
    try:
        reads_probe = any("probe" in json.loads(k) for k in record.get("deps") or {})
    except ValueError:
        reads_probe = True
    then, now = record.get("overrides") or {}, ctx.key_overrides(spec)
    if not reads_probe or not isinstance(then, dict) or then == now:
        return None
    own = {**{f.name: getattr(ProbeSpec(), f.name) for f in fields(ProbeSpec)},
           **(spec.get("probe") or {})}
    keys = [k for k in PROBE_KEYS if {**own, **then}[k] != {**own, **now}[k]]
    if not keys:  # overrides that differ in no probe setting (a hand-edited record)
        return None

    def show(values: dict) -> str:  # as the spec's [probe] writes them; n = None: all images
        vals = {**own, **values}
        return ", ".join(f"{k} = {'all' if vals[k] is None else json.dumps(vals[k])}"
                         for k in keys)

    return f"built with {show(then)}; this run asks {show(now)}"
