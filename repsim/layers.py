"""The one layer-selection rule: which of a model's (or a store's) layers a request names.

Torch-free, so a comparison of cached stores can select layers without loading models.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence

from repsim.errors import UserError


def _split_request(request: str | Sequence[str], name: str = "layers") -> list[str]:
    try:
        items = [request] if isinstance(request, str) else list(request)
    except TypeError:  # not iterable (layers=1 for the name "1"): refused below
        items = [request]
    bad = [item for item in items if not isinstance(item, str)]
    parts = [p.strip() for item in items if isinstance(item, str) for p in item.split(",")]
    if bad or not any(parts):
        raise UserError(f"{name}={request!r} is not a layer request; valid: names, globs, "
                        "'default' or 'blocks' (a list, or one comma-separated string), e.g. "
                        f"{name}='blocks.0,blocks.5'")
    return [p for p in parts if p]


def canonical_request(request: str | Sequence[str] | None) -> list[str]:
    """``request`` spelled one way (its parts, sorted, without duplicates; None is
    ``["default"]``): requests that name the same layers by the same parts are equal, as a
    content address needs (:func:`match_layers` returns layers in model order, whatever the
    order of the parts)."""
    return ["default"] if request is None else sorted(set(_split_request(request)))


def _glob_match(name: str, pattern: str) -> bool:
    """fnmatch per dot-separated segment, so 'blocks.*' means the blocks, not their insides."""
    segs, pats = name.split("."), pattern.split(".")
    return len(segs) == len(pats) and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segs, pats))


def match_layers(candidates: Sequence[str], request: str | Sequence[str],
                 keywords: Mapping[str, Sequence[str]], unknown: Callable[[str], Exception],
                 name: str = "layers") -> list[str]:
    """The ``candidates`` a ``request`` names, in their order, without duplicates. ``request``:
    a list, or one comma-separated string, of names, globs (matched segment by segment:
    ``"blocks.*"`` is not ``blocks.0.attn``) and ``keywords`` (each maps to its layers); a part
    that matches nothing raises ``unknown(part)``; ``name``: the parameter, named in errors."""
    wanted: set[str] = set()
    for part in _split_request(request, name):
        if part in keywords:
            hits = list(keywords[part])
        elif any(c in part for c in "*?["):
            hits = [c for c in candidates if _glob_match(c, part)]
        else:
            hits = [part] if part in candidates else []
        if not hits:
            raise unknown(part)
        wanted.update(hits)
    return [c for c in candidates if c in wanted]
