"""A pytree as a named object graph: leaf paths, node kinds, and rebuilding without a target.

A leaf's **path** is the names of the edges from the root to it, joined with ``/``:
``params/dense/kernel``, ``opt_state/0/mu/params/dense/kernel``. Edge names come from
``jax.tree_util`` key entries:

- a dict key: the key itself if it is a ``str``, its decimal digits if it is an ``int``;
- a sequence index (list, tuple, ``SequenceKey``, ``FlattenedIndexKey``): its decimal digits;
- an attribute (dataclass, flax ``struct.dataclass``, NamedTuple field): the field name.

Inside a name, ``\\`` is written ``\\\\`` and ``/`` is written ``\\/``, and an empty name is
written ``\\_``, so that every path splits back into its names exactly (:func:`split_path`
undoes :func:`join_path`). The root leaf of a tree that is a single leaf has the empty path
``""``.

Matching is by these names only, never by position or container type, which is why a
checkpoint saved from a flax ``struct.dataclass`` restores into a dict or a NamedTuple with
the same field names. ``None`` is a leaf here (JAX treats it as an empty node) because a
checkpoint must give back the ``None`` it was given.
"""

from __future__ import annotations

import itertools
import operator
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from ._errors import PathCollisionError, UnsupportedLeafError

# Node kinds recorded in the commit file. Only "dict", "list" and "tuple" are rebuilt as
# such without a target; every other node comes back as a dict (named children) or a list
# (indexed children). The type's name is kept for display only, never imported.
DICT, LIST, TUPLE, NAMED = "dict", "list", "tuple", "named"
NODE_KINDS = frozenset({DICT, LIST, TUPLE, NAMED})
EMPTY = "\\_"  # an empty name (a dict key "") inside a path


class Node(NamedTuple):
    """An inner node of the graph: its path, kind and the type's qualified name."""

    path: str
    kind: str
    type_name: str


class Flat(NamedTuple):
    """A flattened tree: leaf paths and leaves in ``jax.tree_util`` order, and inner nodes."""

    paths: list[str]
    leaves: list[Any]
    nodes: list[Node]
    treedef: Any


def escape(name: str) -> str:
    """Escapes one edge name so that ``/`` inside it cannot split the path."""
    if not name:
        return EMPTY
    if "\\" in name or "/" in name:
        return name.replace("\\", "\\\\").replace("/", "\\/")
    return name


def child_path(prefix: str, name: str) -> str:
    """Appends the (unescaped) edge ``name`` to the path ``prefix``."""
    name = escape(name)
    return f"{prefix}/{name}" if prefix else name


def join_path(*names: str | int) -> str:
    """The checkpoint path of the leaf or node reached by the edge ``names`` from the root:
    the names joined with ``/``, each escaped (``\\`` and ``/`` inside a name are written
    ``\\\\`` and ``\\/``, an empty name ``\\_``). An ``int`` (a list index, an int dict key)
    is its decimal digits. :func:`split_path` undoes it. These are the paths of
    :class:`RestoreStatus`, :class:`CheckpointMetadata`, ``at=``, ``rename=`` and
    :func:`read_blocks`.

    **Raises:** ``TypeError`` for a name that is neither a ``str`` nor an ``int``.

    Example::

        >>> pc.join_path("params", "dense", "kernel")
        'params/dense/kernel'
        >>> pc.join_path("opt_state", 0, "mu")
        'opt_state/0/mu'
        >>> print(pc.join_path("vocab", "a/b"))  # a "/" inside a name is escaped
        vocab/a\\/b
        >>> pc.join_path()  # the root (a tree that is a single leaf)
        ''
    """
    return "/".join(escape(_edge(name)) for name in names)


def _edge(name: Any) -> str:
    if isinstance(name, str):
        return name
    if hasattr(name, "__index__") and not isinstance(name, bool):
        return str(operator.index(name))
    raise TypeError(f"join_path: a name is a str or an int, not {type(name).__name__} "
                    f"({name!r:.80})")


def split_path(path: str) -> list[str]:
    """The edge names of a checkpoint path, from the root, undoing the escapes of
    :func:`join_path` (a name that was an ``int`` comes back as its digits).

    Example::

        >>> pc.split_path("params/dense/kernel")
        ['params', 'dense', 'kernel']
        >>> pc.split_path(r"vocab/a\\/b")
        ['vocab', 'a/b']
        >>> pc.split_path(pc.join_path("", "x\\\\", 3))  # an empty name, a backslash
        ['', 'x\\\\', '3']
        >>> pc.split_path("")
        []
    """
    if path == "":
        return []
    if "\\" not in path:
        return path.split("/")
    names, current, chars = [], [], iter(path)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, "")
            current.append("" if escaped == "_" else escaped)
        elif ch == "/":
            names.append("".join(current))
            current = []
        else:
            current.append(ch)
    names.append("".join(current))
    return names


def _key_name(entry: Any, parent: str) -> str:
    if isinstance(entry, DictKey):
        key = entry.key
        if isinstance(key, str):
            return key
        if isinstance(key, bool) or not hasattr(key, "__index__"):
            raise PathCollisionError(
                f"dict key {key!r} of type {type(key).__name__} at path {parent or '<root>'!r} "
                "cannot name a checkpoint path: use str or int dict keys"
            )
        return str(operator.index(key))
    if isinstance(entry, GetAttrKey):
        return entry.name
    if isinstance(entry, SequenceKey):
        return str(entry.idx)
    if isinstance(entry, FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _type_name(tp: type) -> str:
    return f"{tp.__module__}.{tp.__qualname__}"


def _node_kind(node: Any, entries: Sequence[Any]) -> str:
    tp = type(node)
    if tp is dict:
        return DICT
    if tp is list:
        return LIST
    if tp is tuple:
        return TUPLE
    if entries and all(isinstance(e, (SequenceKey, FlattenedIndexKey)) for e in entries):
        return LIST
    return NAMED


def _sorted_keys(node: dict) -> list:
    try:
        return sorted(node)
    except TypeError:
        # JAX sorts dict keys; mixed key types cannot be sorted, so say which.
        raise PathCollisionError(
            f"dict keys {sorted(map(repr, node))} cannot be ordered (JAX sorts dict keys, "
            "and int and str keys could collide as path names); use keys of one type"
        ) from None


def _children(node: Any) -> tuple[list[tuple[Any, Any]], bool]:
    """One level of ``node``: ``([(key entry, child), ...], is_node)``."""
    if node is None:
        return [], False
    tp = type(node)
    if tp is dict:
        return [(DictKey(k), node[k]) for k in _sorted_keys(node)], True
    if tp is list or tp is tuple:
        return [(SequenceKey(i), c) for i, c in enumerate(node)], True
    try:
        children, _ = jax.tree_util.flatten_one_level_with_keys(node)
    except ValueError:
        return [], False
    if isinstance(node, tuple) and hasattr(tp, "_fields") and _in_field_order(children, node):  # pyright: ignore[reportArgumentType]  # a list
        # jax 0.10.2's flatten_one_level_with_keys names every NamedTuple child after the
        # first field; where the registry gives the fields in order, they are the names.
        # The registry decides the children and their order (a NamedTuple registered with a
        # flatten of its own keeps that flatten's children and keys).
        return [(GetAttrKey(f), c) for f, (_, c) in zip(tp._fields, children, strict=True)], True
    return list(children), True


def _in_field_order(children: Sequence[tuple[Any, Any]], node: tuple) -> bool:
    return len(children) == len(node) and all(
        c is v for (_, c), v in zip(children, node, strict=True))


_DICT_NAME = _type_name(dict)
_LIST_NAME = _type_name(list)
_TUPLE_NAME = _type_name(tuple)


def flatten(tree: Any, *, treedef: bool = True) -> Flat:
    """Flattens ``tree`` into named leaves and inner nodes, in ``jax.tree_util`` leaf order.

    ``treedef=False`` leaves ``Flat.treedef`` None (a save needs none; it costs a second
    pass over the tree).

    Raises :class:`PathCollisionError` when two edges of one node encode to the same name.

    >>> flatten({"a": [1, 2], "b/c": None}).paths
    ['a/0', 'a/1', 'b\\\\/c']
    """
    paths: list[str] = []
    leaves: list[Any] = []
    nodes: list[Node] = []
    # Types found to be leaves in this call: a type's registration as a pytree node decides,
    # and asking JAX (flatten_one_level) is a call per leaf. Per call, since registrations
    # may change between calls.
    leaf_types: set[type] = {type(None)}

    def walk(node: Any, path: str) -> None:
        tp = type(node)
        # Fast paths (a save of 10,000 leaves waits for this loop): dicts with str keys, lists
        # and tuples, whose distinct children always escape to distinct names.
        named = None
        if tp is dict:
            keys = _sorted_keys(node)
            if all(type(k) is str for k in keys):
                named = [(_escaped(k), node[k]) for k in keys]
                nodes.append(Node(path, DICT, _DICT_NAME))
        elif tp is list or tp is tuple:
            named = [(str(i), c) for i, c in enumerate(node)]
            nodes.append(Node(path, LIST if tp is list else TUPLE,
                              _LIST_NAME if tp is list else _TUPLE_NAME))
        if named is not None:
            prefix = f"{path}/" if path else ""
            for name, child in named:
                if type(child) in leaf_types:
                    paths.append(prefix + name)
                    leaves.append(child)
                else:
                    walk(child, prefix + name)
            return
        children, is_node = _children(node)
        if not is_node:
            leaf_types.add(tp)
            paths.append(path)
            leaves.append(node)
            return
        entries = [e for e, _ in children]
        nodes.append(Node(path, _node_kind(node, entries), _type_name(tp)))
        seen: dict[str, Any] = {}
        for entry, child in children:
            name = _key_name(entry, path)
            if name in seen:
                raise PathCollisionError(
                    f"two children of {path or '<root>'!r} ({tp.__name__}) both encode "
                    f"as {name!r}: keys {seen[name]!r} and {entry!r}; rename one of them"
                )
            seen[name] = entry
            walk(child, child_path(path, name))

    try:
        walk(tree, "")
    except RecursionError:
        # JAX's own flatten fails on such trees too (~5,000 levels), with a SystemError.
        deepest = nodes[-1].path if nodes else ""
        raise UnsupportedLeafError(
            f"the tree is nested too deep to flatten (about {deepest.count('/') + 1} levels "
            f"at {deepest[:80]!r}...; Python's recursion limit is "
            f"{sys.getrecursionlimit()})") from None
    if not treedef:
        return Flat(paths, leaves, nodes, None)
    tdef = jax.tree_util.tree_structure(tree, is_leaf=_is_none)
    _check_lined_up(paths, leaves, tree, tdef)
    return Flat(paths, leaves, nodes, tdef)


def _is_none(x: Any) -> bool:
    return x is None


def _check_lined_up(paths: list[str], leaves: list[Any], tree: Any, tdef: Any) -> None:
    """Raises :class:`UnsupportedLeafError` unless the leaves :func:`flatten` found are JAX's
    leaves of ``tree`` (the ones ``tdef`` is rebuilt from), one for one and in order.

    They differ only for a pytree node whose keyed flatten (which names the paths here)
    gives other children, or another order, than its plain flatten (which ``tdef``
    rebuilds from): a tree rebuilt then would put restored values in the wrong places.
    Compared by identity (one pass of ``tree_leaves``: a tenth of the flatten's cost)."""
    theirs = jax.tree_util.tree_leaves(tree, is_leaf=_is_none)
    if len(theirs) == tdef.num_leaves == len(leaves) and all(
            a is b for a, b in zip(leaves, theirs, strict=True)):
        return
    first = next((i for i, (a, b) in enumerate(zip(leaves, theirs, strict=False)) if a is not b),
                 min(len(leaves), len(theirs)))
    where = f"at {paths[first]!r:.200}" if first < len(paths) else "after the last path"
    raise UnsupportedLeafError(
        f"the tree's leaves as named ({len(leaves)}) do not line up with JAX's flatten of it "
        f"({len(theirs)} leaves), first {where}: a pytree node whose flatten_with_keys gives "
        "other children, or another order, than its flatten; a tree rebuilt from it would "
        "put leaves in the wrong places")


def _escaped(name: str) -> str:
    return name if name and "\\" not in name and "/" not in name else escape(name)


def parent_and_name(path: str) -> tuple[str, str]:
    """The path of ``path``'s parent node, and ``path``'s own (unescaped) edge name."""
    if "\\" not in path:
        parent, _, name = path.rpartition("/")
        return parent, name
    names = split_path(path)
    return join_path(*names[:-1]), names[-1]


def rebuild(nodes: Sequence[Node], values: Mapping[str, Any]) -> Any:
    """Rebuilds nested dicts, lists and tuples from recorded nodes and leaf values by path.

    Nodes of other types come back as dicts (named children) or lists (indexed children):
    their types are never imported from checkpoint content. A leaf whose parent node is
    not recorded (after a rename) gets dict parents.

    >>> rebuild([Node("", "dict", "builtins.dict"), Node("a", "tuple", "builtins.tuple")],
    ...         {"a/0": 1, "a/1": 2})
    {'a': (1, 2)}
    """
    if "" in values and not nodes:
        return values[""]
    fast = _rebuild_recorded(nodes, values)
    if fast is not None:
        return fast
    kinds = {n.path: n.kind for n in nodes}
    kinds.setdefault("", DICT)
    children: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in [*kinds, *values]:
        while path:
            parent, name = parent_and_name(path)
            children[parent].append((name, path))
            if parent in kinds:
                break
            kinds[parent] = DICT  # a renamed leaf may need a new parent
            path = parent

    # Built children first, without recursion: save flattens trees ~1,000 deep, and a
    # recursive build (two frames per level) hit Python's recursion limit at ~490.
    built: dict[str, Any] = {}
    stack = [("", False)]
    while stack:
        path, ready = stack.pop()
        kind = kinds.get(path)
        if kind is None:
            built[path] = values[path]
        elif not ready:
            stack.append((path, True))
            stack.extend((p, False) for _, p in children.get(path, ()))
        else:
            kids = children.get(path, ())
            if kind == LIST or kind == TUPLE:
                seq = [built[p] for _, p in sorted(kids, key=lambda kp: int(kp[0]))]
                built[path] = tuple(seq) if kind == TUPLE else seq
            else:
                built[path] = {name: built[p] for name, p in kids}
    return built[""]


def _rebuild_recorded(nodes: Sequence[Node], values: Mapping[str, Any]) -> Any:
    """:func:`rebuild` when the root and every parent are recorded nodes, as in a commit
    file (fewer steps per leaf than the general way), else None.

    Nodes come parents first (as :func:`flatten` records them): every node starts as a dict
    of its children by name, filled in one pass, and sequences are then made lists and
    tuples children first, by walking the nodes backwards."""
    if not nodes or nodes[0].path != "":
        return None
    parts: dict[str, dict] = {}
    for node in nodes:
        parts[node.path] = {}
    get = parts.get
    for path in itertools.chain(itertools.islice(parts, 1, None), values):
        if "\\" in path:
            parent, name = parent_and_name(path)
        else:  # parent_and_name's common case inlined: it runs per path
            parent, _, name = path.rpartition("/")
        siblings = get(parent)
        if siblings is None:
            return None
        child = get(path)
        siblings[name] = values[path] if child is None else child
    for node in reversed(nodes):
        if node.kind == LIST or node.kind == TUPLE:
            kids = parts[node.path]
            seq = [kids[k] for k in sorted(kids, key=int)]
            done = tuple(seq) if node.kind == TUPLE else seq
            if node.path:
                parent, name = parent_and_name(node.path)
                parts[parent][name] = done
            else:
                return done
    return parts[""]


def relative_to(path: str, at: str) -> str | None:
    """``path`` relative to the subtree ``at``, or None if it lies outside it."""
    if at == "":
        return path
    if path == at:
        return ""
    if path.startswith(at + "/"):
        return path[len(at) + 1 :]
    return None


Rename = Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], str]


def renamer(rename: Rename | None) -> Callable[[str], str]:
    """A function from checkpoint paths to target paths.

    A mapping renames the longest matching prefix (whole names only): with
    ``{"encoder/old": "encoder/new"}``, ``encoder/old/kernel`` becomes ``encoder/new/kernel``.
    A sequence of ``(pattern, replacement)`` pairs is regular-expression rules, applied in
    order, each to the result of the one before (``re.sub``: ``\\1`` in a replacement is
    the first group): ``[(r"^model/layers/(\\d+)/", r"layers/\\1/")]``. A function is
    used as given.

    >>> renamer([(r"^model/", ""), (r"/weight$", "/kernel")])("model/dense/weight")
    'dense/kernel'
    """
    if rename is None:
        return lambda p: p
    if callable(rename):
        return rename
    if not isinstance(rename, Mapping):
        return _rules(rename)
    pairs = sorted(rename.items(), key=lambda kv: -len(kv[0]))

    def apply(path: str) -> str:
        for old, new in pairs:
            rest = relative_to(path, old)
            if rest is not None:
                return new if rest == "" else (f"{new}/{rest}" if new else rest)
        return path

    return apply


def _rules(rules: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    compiled = []
    for rule in rules:
        if not (isinstance(rule, tuple | list) and len(rule) == 2
                and all(isinstance(x, str) for x in rule)):
            raise TypeError(f"rename rule {rule!r:.100}: expected a (pattern, replacement) "
                            "pair of strings")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"rename rule {rule[0]!r:.100}: not a regular expression ({e})"
                             ) from None

    def apply(path: str) -> str:
        for pattern, replacement in compiled:
            path = pattern.sub(replacement, path)
        return path

    return apply
