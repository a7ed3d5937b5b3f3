"""A Flax TrainState with optax Adam, restored into the same and into a changed model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import pytree_ckpt as pc


class MLP(nn.Module):
    widths: tuple[int, ...]
    names: tuple[str, ...]

    @nn.compact
    def __call__(self, x):
        for width, name in zip(self.widths, self.names, strict=True):
            x = nn.relu(nn.Dense(width, name=name)(x))
        return x


def make_state(widths, names, seed=0):
    model = MLP(widths, names)
    params = model.init(jax.random.key(seed), jnp.ones((1, 4)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adam(1e-3))


def trained(state, steps=3):
    def loss(params):
        return jnp.mean(state.apply_fn({"params": params}, jnp.ones((2, 4))) ** 2)

    for _ in range(steps):
        state = state.apply_gradients(grads=jax.grad(loss)(state.params))
    return state


def test_train_state_round_trips_exactly(tmp_path):
    state = trained(make_state((8, 8, 2), ("a", "b", "c")))
    pc.save(state, tmp_path / "c")
    fresh = make_state((8, 8, 2), ("a", "b", "c"), seed=1)
    restored, status = pc.restore(tmp_path / "c", fresh)
    status.assert_consumed()
    assert type(restored) is type(fresh) and restored.apply_fn is fresh.apply_fn
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(restored.step) == 3
    assert "opt_state/0/mu/a/kernel" in status.matched
    info = pc.metadata(tmp_path / "c")
    assert info.node_types["opt_state/0"].endswith("ScaleByAdamState")


def test_changed_model_status_names_exactly_the_changed_paths(tmp_path):
    pc.save(trained(make_state((8, 8, 2), ("a", "b", "c"))), tmp_path / "c")
    # "b" removed, "d" added, "c" reshaped (2 -> 3 outputs).
    changed = make_state((8, 3, 5), ("a", "c", "d"))
    restored, status = pc.restore(tmp_path / "c", changed)
    prefixes = ("params/", "opt_state/0/mu/", "opt_state/0/nu/")
    assert set(status.unmatched) == {p + f"d/{leaf}" for p in prefixes for leaf in ("bias", "kernel")}
    assert set(status.unused) == {p + f"b/{leaf}" for p in prefixes for leaf in ("bias", "kernel")}
    assert {m.path for m in status.mismatched} == {
        p + f"c/{leaf}" for p in prefixes for leaf in ("bias", "kernel")}
    kernel = next(m for m in status.mismatched if m.path == "params/c/kernel")
    assert (kernel.saved_shape, kernel.target_shape) == ((8, 2), (8, 3))
    assert {"step", "params/a/kernel", "opt_state/0/count"} <= set(status.matched)
    # Unmatched and mismatched leaves keep the target's values.
    np.testing.assert_array_equal(restored.params["c"]["kernel"], changed.params["c"]["kernel"])
    np.testing.assert_array_equal(restored.params["d"]["bias"], changed.params["d"]["bias"])
    try:
        status.assert_consumed()
    except AssertionError as e:
        message = str(e)
    else:
        raise AssertionError("assert_consumed() passed on a changed model")
    for path in ("params/d/kernel", "opt_state/0/nu/b/bias", "params/c/kernel"):
        assert path in message


def test_params_only_restore_into_an_inference_tree(tmp_path):
    state = trained(make_state((8, 2), ("a", "b")))
    pc.save(state, tmp_path / "c")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    params, status = pc.restore(tmp_path / "c", target, at="params")
    status.assert_consumed()
    np.testing.assert_array_equal(params["b"]["kernel"], state.params["b"]["kernel"])
    _, status = pc.restore(tmp_path / "c", {"params": target})
    status.assert_existing_matched()
    assert "opt_state/0/mu/a/kernel" in status.unused and "step" in status.unused
