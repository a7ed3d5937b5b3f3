"""metadata: what a checkpoint holds, read from its commit file alone (no array data)."""

from __future__ import annotations

import dataclasses
import functools
import html
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from . import _gc_pause, _graph, _leaves, _storage
from ._format import SavedSharding
from ._open import open_source
from ._placement import devices_for


class LeafMetadata(NamedTuple):
    """One saved leaf: its path, kind, shape, dtype, size, saved sharding and, for Python
    leaves, its value."""

    path: str
    kind: str  # "jax", "numpy", "npscalar", "prngkey" or "py"
    shape: tuple[int, ...]
    dtype: str  # a NumPy dtype name, or the Python type ("int", "str", "none", ...)
    nbytes: int
    sharding: str | None = None
    value: Any = None

    def __repr__(self) -> str:
        # NamedTuple's repr, with a value Python will not write as text shown by its size.
        fields = (f"{name}={_leaves.show_py(v) if name == 'value' else repr(v)}"
                  for name, v in zip(self._fields, self, strict=True))
        return f"LeafMetadata({', '.join(fields)})"

    def __str__(self) -> str:
        if self.kind == _leaves.PY:
            return f"{self.path}: {self.dtype} = {_leaves.show_py(self.value):.60}"
        where = f" sharded {self.sharding}" if self.sharding else ""
        return f"{self.path}: {self.kind} {self.dtype}{list(self.shape)} ({self.nbytes} B){where}"


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """A checkpoint's structure, read from its commit file only.

    - ``tree``: the saved tree rebuilt as nested dicts/lists/tuples of :class:`LeafMetadata`
      (a property, built on first use and kept: most callers read ``leaves`` only).
    - ``leaves``: :class:`LeafMetadata` by path, in save order.
    - ``node_types``: the saved inner nodes' type names by path (for display; never imported).
    - ``nbytes``: the total bytes of array data.
    - ``writer``: library versions, process count and time of the save (for other formats,
      what their files say of it).
    - ``format``: what wrote the checkpoint: ``"pytree_ckpt"``, ``"orbax"``,
      ``"flax_msgpack"`` or ``"safetensors"`` (``format_version`` is 0 for the others).
    - ``carried``: the leaves a manager's step carried over unchanged from an earlier step
      instead of writing them (see :class:`CheckpointManager`), by path: the step folder,
      beside this one, that holds their data.
    """

    path: str
    format_version: int
    leaves: Mapping[str, LeafMetadata]
    node_types: Mapping[str, str]
    nbytes: int
    writer: Mapping[str, Any]
    format: str = "pytree_ckpt"
    carried: Mapping[str, str] = dataclasses.field(default_factory=dict)
    _nodes: tuple[_graph.Node, ...] = dataclasses.field(default=(), repr=False)  # for ``tree``

    @functools.cached_property
    def tree(self) -> Any:
        """The saved tree as nested dicts/lists/tuples of :class:`LeafMetadata`."""
        with _gc_pause.paused():
            return _graph.rebuild(self._nodes, self.leaves)

    @property
    def carried_nbytes(self) -> int:
        """The bytes of the carried leaves (the others' this checkpoint wrote itself)."""
        return sum(self.leaves[p].nbytes for p in self.carried)

    def __hash__(self) -> int:
        return hash((self.path, tuple(self.leaves.items())))

    def __str__(self) -> str:
        kind = "checkpoint" if self.format == "pytree_ckpt" else f"{self.format} checkpoint"
        head = (f"{kind} {self.path}: {len(self.leaves)} leaves, {self.nbytes:,} bytes, "
                f"written by {self.writer.get('library', '?')}")
        return "\n".join([head] + [f"  {leaf}" for leaf in self.leaves.values()])

    def _repr_html_(self) -> str:
        head = html.escape(str(self).splitlines()[0])
        return (f"<details open><summary><b>{head}</b></summary>"
                f"{_html_node(_html_tree(self.leaves.values()), 0)}</details>")


class _Branch:
    """An inner node of the HTML view: its leaves (name, metadata), its inner nodes by name,
    and the count and bytes of every leaf below it."""

    def __init__(self) -> None:
        self.leaves: list[tuple[str, LeafMetadata]] = []
        self.branches: dict[str, _Branch] = {}
        self.count = self.nbytes = 0


def _html_tree(leaves: Any) -> _Branch:
    root = _Branch()
    for m in leaves:
        *parents, name = _graph.split_path(m.path) or [""]
        node = root
        for parent in [None, *parents]:
            if parent is not None:
                node = node.branches.setdefault(parent, _Branch())
            node.count += 1
            node.nbytes += m.nbytes
        node.leaves.append((name, m))
    return root


_HTML_DEPTH = 64  # below this many levels, one flat table (recursion stays far from the limit)


def _html_node(node: _Branch, depth: int) -> str:
    """The leaves of ``node`` as a table (each name titled with its full path), then each inner
    node as a collapsible ``<details>`` with its leaf count and bytes; the first level open."""
    if depth >= _HTML_DEPTH:
        return _html_table([(m.path, m) for m in _leaves_below(node)])
    return _html_table(node.leaves) + "".join(
        f"<details{' open' if depth == 0 else ''}><summary><code>{html.escape(name)}</code> "
        f"({child.count:,} leaves, {child.nbytes:,} bytes)</summary>"
        f"<div style='margin-left:1.5em'>{_html_node(child, depth + 1)}</div></details>"
        for name, child in node.branches.items())


def _leaves_below(node: _Branch) -> list[LeafMetadata]:
    found, todo = [], [node]
    while todo:
        node = todo.pop()
        found += [m for _, m in node.leaves]
        todo += reversed(node.branches.values())
    return found


def _html_table(leaves: list[tuple[str, LeafMetadata]]) -> str:
    rows = "".join(
        f"<tr><td><code title='{html.escape(m.path)}'>{html.escape(name)}</code></td>"
        f"<td>{m.kind}</td><td>{html.escape(m.dtype)}</td><td>{list(m.shape)}</td>"
        f"<td>{m.nbytes:,}</td><td>{html.escape(m.sharding or '')}</td>"
        f"<td>{html.escape(_leaves.show_py(m.value)[:60]) if m.kind == _leaves.PY else ''}</td></tr>"
        for name, m in leaves)
    return ("<table><tr><th>name</th><th>kind</th><th>dtype</th><th>shape</th><th>bytes</th>"
            f"<th>sharding</th><th>value</th></tr>{rows}</table>") if rows else ""


def _sharding_text(s: SavedSharding | None, devices: tuple[Any, ...]) -> str | None:
    """``P('x', 'y') over mesh(x=4, y=2)``; axis types unless all Auto; where the saved
    devices are not all among ``devices`` (``jax.devices()``), what a restore without a
    target does instead (see _placement.devices_for)."""
    if s is None:
        return None
    axes = [f"{n}={d}" for n, d in zip(s.axis_names, s.mesh_shape, strict=True)]
    if s.axis_types and any(t != "Auto" for t in s.axis_types):
        axes = [f"{a} {t}" for a, t in zip(axes, s.axis_types, strict=True)]
    text = f"P{tuple(s.spec)} over mesh({', '.join(axes)})"
    if s.device_ids is not None and not set(s.device_ids) <= {d.id for d in devices}:
        fallback = devices_for(s, list(devices))
        text += (" (saved on devices not all here: restores on jax.devices() in order)"
                 if fallback is not None else
                 " (saved on devices not all here: restores on the default device)")
    return text


# LeafMetadata(*row) without its Python-level __new__, once per leaf.
_LEAF = functools.partial(tuple.__new__, LeafMetadata)


def metadata(path: str | os.PathLike | dict) -> CheckpointMetadata:
    """Describes the checkpoint at ``path`` from its commit file, reading no array data.

    **Returns:** a :class:`CheckpointMetadata` (``str()`` lists every leaf; it renders as a
    table in a notebook).

    **Raises:** as :func:`restore` does for a missing, incomplete or corrupt checkpoint.

    Example::

        >>> info = pc.metadata("memory://doc/save")
        >>> info.leaves["w"].shape, info.leaves["step"].value
        ((3,), 7)
    """
    return _metadata(_storage.location(path))


def _metadata(loc: _storage.Location) -> CheckpointMetadata:
    ckpt = open_source(loc)  # the reads: the collector stays on (see _gc_pause)
    with _gc_pause.paused():  # the per-leaf loops
        nodes = ckpt.tree_nodes()
        devices = tuple(jax.devices())
        text = functools.lru_cache(maxsize=None)(  # a tree has few layouts
            lambda s: _sharding_text(s, devices))
        paths, origins, shapes, dtypes, nbytes, shardings, values = ckpt.leaves.summaries()
        rows = zip(paths, origins, shapes, dtypes, nbytes, map(text, shardings), values,
                   strict=True)
        leaves = dict(zip(paths, map(_LEAF, rows), strict=True))
        return CheckpointMetadata(
            path=loc.url, format_version=ckpt.version, format=ckpt.format,
            leaves=leaves, node_types={n.path: n.type_name for n in nodes},
            nbytes=sum(nbytes), writer=dict(ckpt.writer), carried=dict(ckpt.carried),
            _nodes=nodes)
