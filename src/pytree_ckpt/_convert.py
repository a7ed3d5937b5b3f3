"""The work of ``pytree-ckpt convert``: a checkpoint of any format :func:`restore` reads, its
leaves chosen by path patterns, written as ours or as one safetensors file. _cli.py parses the
arguments and prints the report this returns.

A safetensors source's ``__metadata__`` goes on to a safetensors destination; a pytree_ckpt
checkpoint has no place for it, so the report names what was dropped.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from . import _graph
from ._errors import UnsupportedLeafError
from ._foreign.safetensors import save_safetensors
from ._metadata import metadata as _metadata
from ._restore import restore
from ._save import save


def pattern(text: str) -> re.Pattern:
    """``text`` compiled, for ``--only`` and ``--exclude`` (argparse names the flag)."""
    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None


def convert(src: str, dst: str, *, at: str | None, to: str | None,
            only: Sequence[re.Pattern], exclude: Sequence[re.Pattern], overwrite: bool,
            progress: bool) -> dict[str, Any]:
    """Converts ``src`` to ``dst`` (``to``: ``"pytree_ckpt"`` or ``"safetensors"``; None: by
    ``dst``'s name), keeping the leaves (under ``at``) whose path matches one of ``only``
    (all if empty) and none of ``exclude``; returns the report the CLI prints.

    **Raises:** what :func:`restore`, :func:`save` and :func:`save_safetensors` raise;
    ``ValueError`` if the patterns leave no leaf.
    """
    to = to or ("safetensors" if dst.endswith(".safetensors") else "pytree_ckpt")
    info = _metadata(src)
    tree, _ = restore(src, at=at, progress=progress)
    tree, left_out = select(tree, lambda path: (
        (not only or any(r.search(path) for r in only))
        and not any(r.search(path) for r in exclude)))
    leaves = len(_graph.flatten(tree, treedef=False).paths)
    if left_out and not leaves:
        raise ValueError(f"{info.path}: --only/--exclude leave none of its {len(left_out)} "
                         "leaves")
    metadata = dict(info.writer.get("metadata") or {}) if info.format == "safetensors" else {}
    try:
        if to == "safetensors":  # one write of one buffer: no bar to show
            written = save_safetensors(tree, dst, metadata=metadata, overwrite=overwrite)
        else:
            written = save(tree, dst, overwrite=overwrite, progress=progress)
    except UnsupportedLeafError as e:
        if to != "safetensors":
            raise
        raise UnsupportedLeafError(
            f"{e} (safetensors holds arrays only: leave such leaves out with --exclude REGEX, "
            "or convert a subtree of arrays, e.g. --at params)") from None
    nbytes = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))
    return {"source": info.path, "source_format": info.format, "at": at,
            "destination": written, "format": to, "leaf_count": leaves, "nbytes": nbytes,
            "left_out": left_out, "metadata_dropped": {} if to == "safetensors" else metadata}


def select(tree: Any, keep: Callable[[str], bool]) -> tuple[Any, list[str]]:
    """``tree`` with only the leaves whose path ``keep`` accepts, as nested dicts, lists and
    tuples, and the paths of the leaves left out. A node left without leaves is left out (an
    empty one is kept if ``keep`` accepts its path); a list or tuple that lost an element
    becomes a dict of the indices left, so every kept leaf keeps its path.

    >>> select({"a": [1, 2], "b": {"c": 3}}, lambda path: path != "a/0")
    ({'a': {'1': 2}, 'b': {'c': 3}}, ['a/0'])
    """
    flat = _graph.flatten(tree, treedef=False)
    kept = {p: v for p, v in zip(flat.paths, flat.leaves, strict=True) if keep(p)}
    dropped = [p for p in flat.paths if p not in kept]
    if not dropped:
        return tree, []

    def ancestors(paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for path in paths:
            while path and (path := _graph.parent_and_name(path)[0]) not in found:
                found.add(path)
        return found | {""}

    live, has_leaves = ancestors(list(kept)), ancestors(flat.paths)
    chosen: set[str] = set()
    for n in flat.nodes:  # parents before children
        if n.path in live or (n.path not in has_leaves and keep(n.path)
                              and _graph.parent_and_name(n.path)[0] in chosen):
            chosen.add(n.path)
    short = ({_graph.parent_and_name(p)[0] for p in dropped}
             | {_graph.parent_and_name(n.path)[0] for n in flat.nodes if n.path not in chosen})
    nodes = [n._replace(kind=_graph.DICT) if n.path in short and n.kind in (_graph.LIST, _graph.TUPLE) else n
             for n in flat.nodes if n.path in chosen]
    return _graph.rebuild(nodes, kept), dropped
