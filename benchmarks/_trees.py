"""The benchmark trees: abstract specs first, then values.

Every tree is described by an abstract spec (a pytree of `jax.ShapeDtypeStruct` carrying a
sharding), so that the restore target, the RSS workers and the value builder agree on
one structure without building the values twice. `materialize` fills a spec with
non-zero random values from a fixed seed.

- small: 10,000 float32 leaves of 1-16 KiB in a nested dict 3 levels deep.
- big: 16 float32 arrays of 4096x4096 (1 GiB).
- train: a GPT-2-small-like transformer (12 blocks, width 768, MLP 3072, 32k vocab) with
  its optax Adam state (`ScaleByAdamState` count/mu/nu, `EmptyState`) and a step: ~1.3 GB.
- sharded: the train tree over a 4x2 mesh of 8 (virtual CPU) devices.

`--smoke` uses tiny versions of the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

SEED = 0
TREE_NAMES = ("small", "big", "train", "sharded")


class TransformerShape(NamedTuple):
    """Sizes of the transformer of the `train` and `sharded` trees."""

    blocks: int
    width: int
    mlp: int
    vocab: int
    context: int


FULL_TRANSFORMER = TransformerShape(blocks=12, width=768, mlp=3072, vocab=32_000, context=1024)
SMOKE_TRANSFORMER = TransformerShape(blocks=2, width=64, mlp=256, vocab=512, context=64)


# ---------------------------------------------------------------------------------------
# Specs (shapes, dtypes, shardings; no values)


def tree_spec(name: str, smoke: bool) -> Any:
    """The abstract spec of the named benchmark tree."""
    builders: dict[str, Callable[[bool], Any]] = {
        "small": _small_spec,
        "big": _big_spec,
        "train": lambda s: _train_spec(s, sharded=False),
        "sharded": lambda s: _train_spec(s, sharded=True),
    }
    return builders[name](smoke)


def _default_sharding() -> SingleDeviceSharding:
    return SingleDeviceSharding(jax.devices()[0])


def _f32(shape: tuple[int, ...], sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding or _default_sharding())


def _small_spec(smoke: bool) -> dict:
    """10 x 10 x 100 leaves (smoke: 4 x 5 x 10) of 1-16 KiB each, random sizes."""
    outer, middle, inner = (4, 5, 10) if smoke else (10, 10, 100)
    sizes = iter(np.random.default_rng(SEED).integers(256, 4097, size=outer * middle * inner))
    return {
        f"group{i:02d}": {
            f"layer{j:02d}": {f"w{k:03d}": _f32((int(next(sizes)),)) for k in range(inner)}
            for j in range(middle)
        }
        for i in range(outer)
    }


def _big_spec(smoke: bool) -> dict:
    side = 256 if smoke else 4096
    return {f"array{i:02d}": _f32((side, side)) for i in range(16)}


def _train_spec(smoke: bool, sharded: bool) -> dict:
    """{"step", "params", "opt_state": (ScaleByAdamState(count, mu, nu), EmptyState())}."""
    shape = SMOKE_TRANSFORMER if smoke else FULL_TRANSFORMER
    params = _transformer_params(shape)
    if sharded:
        params = _shard_params(params)
    scalar = _default_sharding() if not sharded else NamedSharding(_mesh(), P())
    opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
    opt_state = _with_param_shardings(opt_state, params, scalar)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar)
    return {"step": step, "params": params, "opt_state": opt_state}


def _dense(fan_in: int, fan_out: int) -> dict:
    return {"kernel": _f32((fan_in, fan_out)), "bias": _f32((fan_out,))}


def _layernorm(width: int) -> dict:
    return {"scale": _f32((width,)), "bias": _f32((width,))}


def _block(s: TransformerShape) -> dict:
    return {
        "ln_1": _layernorm(s.width),
        "attn": {"qkv": _dense(s.width, 3 * s.width), "out": _dense(s.width, s.width)},
        "ln_2": _layernorm(s.width),
        "mlp": {"fc": _dense(s.width, s.mlp), "proj": _dense(s.mlp, s.width)},
    }


def _transformer_params(s: TransformerShape) -> dict:
    """Flax-style parameter names of a GPT-2-like decoder (tied output embedding)."""
    params = {
        "wte": {"embedding": _f32((s.vocab, s.width))},
        "wpe": {"embedding": _f32((s.context, s.width))},
    }
    params.update({f"h_{i}": _block(s) for i in range(s.blocks)})
    params["ln_f"] = _layernorm(s.width)
    return params


# ---------------------------------------------------------------------------------------
# Sharding of the `sharded` tree: FSDP over "data" (4) x tensor parallel over "model" (2)


def _mesh() -> Mesh:
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        raise RuntimeError(
            "the sharded tree needs 8 devices: set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax"
        )
    return Mesh(devices.reshape(4, 2), ("data", "model"))


def _partition_spec(path: str, ndim: int) -> P:
    """Column-parallel in-projections, row-parallel out-projections, vocab-parallel embedding."""
    if ndim < 2:
        return P()
    if path.endswith(("qkv/kernel", "fc/kernel")):
        return P("data", "model")
    if path.endswith(("out/kernel", "proj/kernel", "wte/embedding")):
        return P("model", "data")
    return P("data", None)


def _shard_params(params: dict) -> dict:
    mesh = _mesh()

    def place(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        spec = _partition_spec(keystr(path), len(leaf.shape))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, params)


def _with_param_shardings(opt_state: Any, params: dict, scalar: Any) -> Any:
    """Adam's mu and nu take their parameter's sharding; the count is a replicated scalar."""
    _, empty = opt_state
    return (
        optax.ScaleByAdamState(
            count=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar), mu=params, nu=params
        ),
        empty,
    )


# ---------------------------------------------------------------------------------------
# Values


def materialize(spec: Any, seed: int = SEED) -> Any:
    """A tree of `jax.Array`s with the spec's shapes and shardings, non-zero random values."""
    rng = np.random.default_rng(seed)

    def fill(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        return jax.device_put(_random_values(rng, leaf), leaf.sharding)

    tree = jax.tree_util.tree_map(fill, spec)
    return jax.block_until_ready(tree)


def _random_values(rng: np.random.Generator, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    if jnp.issubdtype(leaf.dtype, jnp.integer):
        return np.full(leaf.shape, 1000, dtype=leaf.dtype)  # a step count, not zero
    values = rng.standard_normal(leaf.shape, dtype=np.float32)
    values *= 0.02
    return values.astype(leaf.dtype, copy=False)


# ---------------------------------------------------------------------------------------
# Measuring trees


def tree_bytes(tree: Any) -> int:
    return sum(map(leaf_bytes, _leaves(tree)))


def leaf_bytes(x: Any) -> int:
    """The bytes of one leaf: an array or a ``jax.ShapeDtypeStruct`` (which has no nbytes)."""
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def leaf_count(tree: Any) -> int:
    return len(_leaves(tree))


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_leaves(tree)


def keystr(path: tuple) -> str:
    """A key path as pytree_ckpt spells it for dict keys, fields and indices: `a/b/0`."""
    return "/".join(_key_name(k) for k in path)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


class Subtree(NamedTuple):
    """A subtree reachable through dict keys only, and its share of the tree's bytes."""

    path: str
    spec: Any
    fraction: float


def subtree_near(spec: Any, fraction: float = 0.01) -> Subtree | None:
    """The dict-keyed inner node whose share of the bytes is closest to `fraction`.

    Only dict keys are followed, so the path needs no escaping and means the same in
    every checkpointer's naming. None for a flat tree (`big`): no inner node to pick.
    """
    total = tree_bytes(spec)
    candidates = [Subtree(path, node, tree_bytes(node) / total) for path, node in _dict_subtrees(spec, "")]
    if not candidates:
        return None
    return min(candidates, key=lambda s: abs(np.log(s.fraction / fraction)))


def subtree_of(tree: Any, path: str) -> Any:
    """The node of `tree` at a dict-keyed path `a/b/c`."""
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _dict_subtrees(node: Any, prefix: str):
    if not isinstance(node, dict):
        return
    for key, child in node.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(child, dict):
            yield path, child
            yield from _dict_subtrees(child, path)
