"""save_in_jit: saving from inside a jitted function, through an ordered ``io_callback``.

The traced leaves (and the traced fields of the path template) are handed to an ordered
``jax.experimental.io_callback``; when the compiled step reaches it, XLA copies them to host
memory and calls back into Python, which formats the path and runs :func:`save` there,
synchronously. Leaves that are not traced (Python values, NumPy constants) are captured at
trace time and saved as they are.

Why a sibling of :func:`save` rather than ``save`` detecting tracers: inside a trace there
is no path string to return and no future to wait on, the path is a template filled from
traced values, errors surface when the step's outputs are waited on, and it works in one
process only. One name per behaviour keeps each signature honest.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import io_callback

from . import _distributed
from ._errors import SaveError
from ._save import save


def save_in_jit(tree: Any, path: str, fields: Mapping[str, Any] | None = None, *,
                overwrite: bool = False) -> None:
    """Saves ``tree`` from inside ``jax.jit`` (also under ``lax.cond``, ``scan``, loops).

    The checkpoint is written when the compiled computation reaches this point, in program
    order with other ordered effects; ``path`` is a :meth:`str.format` template filled with
    ``fields``, which may be traced scalars (e.g. ``{"step": state.step}``).

    **Arguments:**

    - ``tree``: the pytree to save; traced leaves are saved as ``jax.Array`` (typed PRNG
      keys as keys), other leaves as they are.
    - ``path``: a path template such as ``"/ckpt/step_{step:06d}"`` (any location
      :func:`save` accepts, as a string).
    - ``fields``: the values for the template by name, traced scalars or Python values; a
      mapping of its own, so any name may be a field (``overwrite`` and ``path`` included).
    - ``overwrite``: as for :func:`save`.

    **Returns:** None (the save is an effect of the compiled step).

    **Cost:** inside the step, every traced leaf is copied device-to-host (in a multi-device
    computation, first gathered onto one device: XLA warns of a "full rematerialization"),
    and the step waits while the checkpoint is written and committed. Use it for small
    states or infrequent saves, under ``lax.cond(step % k == 0, ...)``; for large sharded
    states call :func:`save_async` between steps instead, which copies only owned shards
    and writes in the background.

    **Limits:** one process only (the callback runs on one host, which cannot write other
    hosts' shards); the saved sharding is not recorded (the callback sees gathered arrays),
    so a restore without a target places leaves on the default device. Block on the step's
    outputs, or call ``jax.effects_barrier()``, before reading a checkpoint it wrote.

    **Raises:** at trace time, :class:`SaveError` in a multi-process run, ``TypeError`` for
    ``fields`` that is not a mapping of str names, or a traced field that is not a scalar,
    ``ValueError`` for a template that ``fields`` cannot fill. At run time, what
    :func:`save` raises (an existing checkpoint without ``overwrite``, a failed write)
    surfaces from the computation as a ``JaxRuntimeError`` when its outputs are waited on.

    Example::

        >>> import jax, jax.numpy as jnp, pytree_ckpt as pc
        >>> @jax.jit
        ... def step(state):
        ...     jax.lax.cond(state["step"] % 2 == 0,
        ...                  lambda: pc.save_in_jit(state, "memory://doc/jit/{step}",
        ...                                         {"step": state["step"]}),
        ...                  lambda: None)
        ...     return {"w": state["w"] + 1, "step": state["step"] + 1}
        >>> state = {"w": jnp.zeros(2), "step": jnp.int32(0)}
        >>> for _ in range(3):
        ...     state = step(state)
        >>> jax.effects_barrier()
        >>> pc.restore("memory://doc/jit/2")[0]["w"]
        Array([2., 2.], dtype=float32)
    """
    if _distributed.is_multiprocess():
        raise SaveError(
            f"{path}: save_in_jit works in a single process only (its callback runs on one "
            f"host; this run has {_distributed.process_count()} processes); call save_async "
            "on the step's outputs between steps instead")
    if not isinstance(path, str):
        raise TypeError(f"save_in_jit: path must be a str template, not {type(path).__name__}")
    if fields is None:
        fields = {}
    if not isinstance(fields, Mapping) or not all(isinstance(k, str) for k in fields):
        raise TypeError("save_in_jit: fields must be a mapping of str names to values, e.g. "
                        f"{{'step': state.step}}, not {type(fields).__name__}")
    fields = dict(fields)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    traced, impls = [], {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                # A callback receives a key's raw data: keep its implementation to rewrap it.
                impls[i] = str(jax.random.key_impl(leaf))
                leaf = jax.random.key_data(leaf)
            traced.append((i, leaf))
    traced_fields = {k: v for k, v in fields.items() if isinstance(v, jax.Array)}
    for name, value in traced_fields.items():
        if value.shape != ():
            raise TypeError(f"save_in_jit: field {name!r} has shape {value.shape}; path "
                            "fields must be scalars")
    _check_template(path, fields)

    def callback(*args: Any) -> None:
        values = list(leaves)
        for (i, _), value in zip(traced, args[:len(traced)], strict=True):
            values[i] = jax.random.wrap_key_data(value, impl=impls[i]) if i in impls else value
        filled = dict(fields)
        for name, value in zip(traced_fields, args[len(traced):], strict=True):
            filled[name] = np.asarray(value).item()
        save(jax.tree_util.tree_unflatten(treedef, values), path.format(**filled),
             overwrite=overwrite)

    io_callback(callback, None, *(leaf for _, leaf in traced), *traced_fields.values(),
                ordered=True)


def _check_template(path: str, fields: dict[str, Any]) -> None:
    """Fails at trace time, not at step 1000, if ``fields`` cannot fill the template."""
    names = {name.split(".")[0].split("[")[0]
             for _, name, _, _ in string.Formatter().parse(path) if name is not None}
    missing = sorted(n for n in names if n not in fields)
    if missing or "" in names:
        raise ValueError(f"save_in_jit: path template {path!r} names {missing or ['{}']} but "
                       f"the fields given are {sorted(fields)}; give them in fields, e.g. "
                       "{'step': state.step}")
    sample = {k: (_sample(v) if isinstance(v, jax.Array) else v) for k, v in fields.items()}
    try:
        path.format(**sample)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"save_in_jit: path template {path!r} cannot be filled from the "
                         f"fields {sorted(fields)}: {e}") from None


def _sample(value: jax.Array) -> Any:
    return np.zeros((), value.dtype).item()
