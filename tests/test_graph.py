import collections
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pytree_ckpt as pc
from pytree_ckpt import _graph


@given(st.lists(st.text(), min_size=1, max_size=5))
def test_paths_split_back_into_their_names(names):
    path = ""
    for name in names:
        path = _graph.child_path(path, name)
    assert _graph.split_path(path) == names


def test_escaping_of_slash_and_backslash():
    assert _graph.child_path("a", "b/c") == "a/b\\/c"
    assert _graph.child_path("a", "d\\") == "a/d\\\\"
    assert _graph.split_path("a/b\\/c/d\\\\") == ["a", "b/c", "d\\"]
    assert _graph.child_path("", "") == "\\_" and _graph.split_path("\\_/\\_") == ["", ""]


def test_flatten_names_every_kind_of_edge():
    NT = collections.namedtuple("NT", "mu nu")
    tree = {"d": {"x": 1, "y/z": "two"}, "i": {2: 0, 10: 1}, "l": [None, (3.0,)],
            "nt": NT(np.zeros(1), np.ones(1))}
    flat = _graph.flatten(tree)
    assert flat.paths == ["d/x", "d/y\\/z", "i/2", "i/10", "l/0", "l/1/0", "nt/mu", "nt/nu"]
    kinds = {n.path: n.kind for n in flat.nodes}
    assert kinds == {"": "dict", "d": "dict", "i": "dict", "l": "list", "l/1": "tuple",
                     "nt": "named"}
    # Leaf order is jax.tree_util's, with None as a leaf.
    assert len(flat.leaves) == len(jax.tree_util.tree_leaves(tree, is_leaf=lambda x: x is None))


def test_namedtuple_fields_are_named_correctly():
    # jax 0.10.2's flatten_one_level_with_keys names every NamedTuple child after field 0.
    NT = collections.namedtuple("NT", "count mu nu")
    assert _graph.flatten(NT(0, 1, 2)).paths == ["count", "mu", "nu"]


def test_int_and_str_keys_that_collide_as_text_raise_clearly():
    # JAX itself cannot order {1: a, "1": b}; we say so instead of losing either leaf.
    with pytest.raises(pc.PathCollisionError, match=r"dict keys \[\"'1'\", '1'\] cannot be ordered"):
        _graph.flatten({"inner": {1: "a", "1": "b"}})


def test_custom_nodes_whose_keys_collide_raise_naming_the_node():
    @jax.tree_util.register_pytree_with_keys_class
    class Twice:
        def __init__(self, a, b):
            self.a, self.b = a, b

        def tree_flatten_with_keys(self):
            return [(jax.tree_util.GetAttrKey("x"), self.a), (jax.tree_util.DictKey("x"), self.b)], None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    with pytest.raises(pc.PathCollisionError, match=r"two children of 'inner' \(Twice\) both encode as 'x'"):
        _graph.flatten({"inner": Twice(1, 2)})


def test_unnameable_dict_key_raises():
    with pytest.raises(pc.PathCollisionError, match=r"dict key \(1, 2\) of type tuple"):
        _graph.flatten({(1, 2): 1})


def test_rebuild_restores_dicts_lists_tuples_and_empty_nodes():
    tree = {"a": [1, (2, 3)], "e": {}, "t": (), "x/y": {"z": None}}
    flat = _graph.flatten(tree)
    assert _graph.rebuild(flat.nodes, dict(zip(flat.paths, flat.leaves, strict=True))) == tree


@pytest.mark.parametrize("tree", [
    {"a": [1, (2, 3)], "e": {}, "t": (), "x/y": {"z": None}, "": {"\\": [[], [{}]]}},
    [[{"b": (1,)}] * 12, ()],  # list indices 10, 11 sort after 9, not after 1
    ((((1,),),),),
])
def test_rebuild_of_recorded_nodes_takes_the_fast_path_and_agrees(tree):
    flat = _graph.flatten(tree)
    values = dict(zip(flat.paths, flat.leaves, strict=True))
    fast = _graph._rebuild_recorded(flat.nodes, values)
    assert fast == tree and type(fast) is type(tree)
    # A leaf without a recorded parent (after a rename) goes the general way: dict parents.
    assert _graph._rebuild_recorded(flat.nodes, {**values, "new/x": 1}) is None
    if isinstance(tree, dict):
        assert _graph.rebuild(flat.nodes[:1], {"new/x": 1}) == {"new": {"x": 1}}


def test_renamer_replaces_whole_name_prefixes_only():
    f = _graph.renamer({"enc/old": "enc/new", "a": ""})
    assert f("enc/old/kernel") == "enc/new/kernel"
    assert f("enc/older/kernel") == "enc/older/kernel"
    assert f("a/b") == "b"


@given(st.lists(st.text(), max_size=5))
def test_public_join_and_split_path_undo_each_other(names):
    assert pc.split_path(pc.join_path(*names)) == names


def test_public_join_path_names_what_flatten_names():
    tree = {"params": {"a/b": [0.0, {"": 1.0, "x\\": 2.0}]}, "ints": {7: 3.0}}
    paths = _graph.flatten(tree).paths
    assert pc.join_path("params", "a/b", 1, "") in paths
    assert pc.join_path("params", "a/b", 1, "x\\") == "params/a\\/b/1/x\\\\" and \
        "params/a\\/b/1/x\\\\" in paths
    assert pc.join_path("ints", 7) == "ints/7" == pc.join_path("ints", np.int64(7))
    assert "ints/7" in paths
    assert pc.join_path() == "" and pc.split_path("") == []
    with pytest.raises(TypeError, match="a name is a str or an int, not float"):
        pc.join_path("a", 1.5)
    with pytest.raises(TypeError, match="not bool"):
        pc.join_path(True)


# ---- flatten's order is JAX's: what restore rebuilds with ----

class _Point(typing.NamedTuple):
    x: object
    y: object


@jax.tree_util.register_pytree_with_keys_class
class _Keyed:
    """A custom node with keys (GetAttrKey-named children, in a non-alphabetical order)."""

    def __init__(self, b, a):
        self.b, self.a = b, a

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("b"), self.b), (jax.tree_util.GetAttrKey("a"), self.a)), None

    def tree_flatten(self):
        return (self.b, self.a), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


class _Plain:
    """A custom node registered without keys: JAX names its children by index."""

    def __init__(self, *children):
        self.children = children


jax.tree_util.register_pytree_node(_Plain, lambda p: (p.children, None),
                                   lambda aux, children: _Plain(*children))


def _every_node_kind():
    import flax.struct
    import optax

    @flax.struct.dataclass
    class TrainState:
        step: object
        params: object
        opt_state: object
        name: str = flax.struct.field(pytree_node=False, default="run")

    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
              "embed": jnp.ones((4, 2), jnp.bfloat16)}
    return {
        "state": TrainState(step=jnp.int32(3), params=params,
                            opt_state=optax.chain(optax.clip(1.0), optax.adam(1e-3)).init(params)),
        "ints": {10: np.arange(2), 2: 2.5, 1: None},  # JAX sorts 1, 2, 10 (not as text)
        "names": {"a/b": 1, "": 2, "x\\y": 3, "B": 4, "a": [5, (6, None)]},
        "point": _Point(x=jnp.ones(1), y=[7, _Point(8, 9)]),
        "keyed": _Keyed(b=np.float32(1), a=np.float32(2)),
        "plain": _Plain(10, {"z": 11}),
        "empty": [{}, (), []],
        "none": None,
        "scalars": (True, 0, 1.5, "text", b"bytes", 2 + 3j),
    }


def _jax_path(keys) -> str:
    names = []
    for key in keys:
        if isinstance(key, jax.tree_util.DictKey):
            name = str(key.key)
        elif isinstance(key, jax.tree_util.GetAttrKey):
            name = key.name
        elif isinstance(key, jax.tree_util.SequenceKey):
            name = str(key.idx)
        else:
            name = str(key.key)  # FlattenedIndexKey
        names.append(name)
    return pc.join_path(*names)


def test_flatten_is_jax_flatten_with_path_over_every_node_kind():
    tree = _every_node_kind()
    flat = _graph.flatten(tree)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    assert flat.treedef == treedef
    assert len(flat.leaves) == len(with_path) == treedef.num_leaves > 30
    for ours, path, (keys, leaf) in zip(flat.leaves, flat.paths, with_path, strict=True):
        assert ours is leaf, path
        assert path == _jax_path(keys)
    assert [p for p in flat.paths if p.startswith("ints/")] == ["ints/1", "ints/2", "ints/10"]
    assert [p for p in flat.paths if p.startswith("keyed/")] == ["keyed/b", "keyed/a"]
    assert [p for p in flat.paths if p.startswith("plain/")] == ["plain/0", "plain/1/z"]
    # And restore rebuilds that tree with every leaf in its place.
    rebuilt = jax.tree_util.tree_unflatten(flat.treedef, flat.leaves)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(tree)


@jax.tree_util.register_pytree_with_keys_class
class _Disagreeing:
    """A node whose keyed flatten gives its children in another order than its flatten."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("b"), self.b), (jax.tree_util.GetAttrKey("a"), self.a)), None

    def tree_flatten(self):
        return (self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_restore_refuses_a_target_whose_leaves_do_not_line_up():
    pc.save({"n": {"a": jnp.zeros(2), "b": jnp.ones(2)}}, "memory://graph/lined_up")
    target = {"n": _Disagreeing(jnp.zeros(2), jnp.zeros(2))}
    with pytest.raises(pc.UnsupportedLeafError, match="do not line up with JAX's flatten.*'n/b'"):
        pc.restore("memory://graph/lined_up", target)
