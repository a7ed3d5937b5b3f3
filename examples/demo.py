"""pytree_ckpt demo: train, checkpoint, "restart", resume with identical losses, load weights.

Run it with ``make demo`` (or ``python examples/demo.py [--dir DIR]``). It trains a small
Flax MLP with optax Adam on synthetic data on the CPU, saving every 40 steps through a
``CheckpointManager``; then, as a second run would after a restart, it restores the latest
checkpoint into a freshly built model and shows that training continues with exactly the
losses of the first run, and shows that a resume into a changed model is refused unless
``strict=False``. Finally it loads only the weights into an inference tree.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import pytree_ckpt as pc

STEPS, EVERY, KEEP = 300, 40, 3


class MLP(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width, name="hidden")(x))
        return nn.Dense(1, name="out")(x)


def fresh_state(seed: int, width: int = 64) -> train_state.TrainState:
    model = MLP(width)
    params = model.init(jax.random.key(seed), jnp.ones((1, 8)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adam(3e-3))


def batch(step: int) -> tuple[jax.Array, jax.Array]:
    """The same synthetic batch for a step in every run: y = sin(x . w)."""
    x = jax.random.normal(jax.random.fold_in(jax.random.key(42), step), (64, 8))
    return x, jnp.sin(x @ jnp.linspace(-1.0, 1.0, 8))[:, None]


@jax.jit
def train_step(state, x, y):
    def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def train(state, mgr: pc.CheckpointManager, first: int, last: int) -> dict[int, float]:
    """Trains steps first..last, saving through ``mgr``; returns the loss of every step."""
    losses = {}
    for step in range(first, last + 1):
        state, loss = train_step(state, *batch(step))
        losses[step] = float(loss)
        start = time.perf_counter()
        if mgr.save(step, state):
            print(f"  step {step:3d}  loss {losses[step]:.6f}  saved (save_async blocked "
                  f"{(time.perf_counter() - start) * 1e3:.1f} ms)")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="checkpoint directory (default: a temporary one)")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="pytree_ckpt_demo_")

    print(f"== run 1: train {STEPS} steps, checkpoint every {EVERY} into {directory}")
    with pc.CheckpointManager(directory, keep=KEEP, save_interval_steps=EVERY) as mgr:
        first_run = train(fresh_state(seed=0), mgr, 1, STEPS)
        start = time.perf_counter()
        mgr.wait()
        print(f"  last save committed {(time.perf_counter() - start) * 1e3:.1f} ms after the "
              f"loop; kept steps {mgr.steps()} (keep={KEEP})")

    print("== run 2: a fresh process would start here: restore the latest checkpoint")
    with pc.CheckpointManager(directory, keep=KEEP, save_interval_steps=EVERY) as mgr:
        step = mgr.latest_step()
        start = time.perf_counter()
        state, status = mgr.restore(target=fresh_state(seed=123))
        print(f"  restored step {step} in {(time.perf_counter() - start) * 1e3:.1f} ms")
        print("  " + str(status).replace("\n", "\n  "))
        status.assert_consumed()
        assert int(state.step) == step
        # A resume into a changed model (a wider hidden layer) raises rather than training on
        # from fresh weights; strict=False accepts it and returns the status to act on.
        wider = fresh_state(seed=0, width=96)
        try:
            mgr.restore(step, target=wider)
        except pc.PartialRestoreError as e:
            print(f"  resume into a wider model refused: {str(e).splitlines()[0]}")
        _, status = mgr.restore(step, target=wider, strict=False)
        print(f"  with strict=False: {len(status.matched)} matched, {len(status.mismatched)} "
              f"mismatched, e.g. {status.mismatched[0]}")
        second_run = train(state, mgr, step + 1, STEPS)
    same = all(second_run[s] == first_run[s] for s in second_run)
    print(f"  steps {step + 1}..{STEPS}: run 1 loss {first_run[STEPS]:.6f}, run 2 loss "
          f"{second_run[STEPS]:.6f}: {'identical losses' if same else 'LOSSES DIFFER'}")
    assert same, "resumed training diverged from the original run"

    print("== inference: load only the weights")
    path = pc.latest(directory)
    weights = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                           fresh_state(seed=0).params)
    start = time.perf_counter()
    params, status = pc.restore(path, weights, at="params")
    print(f"  restore(at='params') in {(time.perf_counter() - start) * 1e3:.1f} ms: {status}")
    status.assert_consumed()
    _, status = pc.restore(path, {"params": weights})
    unused = sorted({p.split("/")[0] for p in status.unused})
    print(f"  restoring {{'params': ...}} from the whole checkpoint: {len(status.matched)} "
          f"matched, {len(status.unused)} unused under {unused} (the optimizer state and step)")
    x, y = batch(10_000)
    loss = float(jnp.mean((MLP().apply({"params": params}, x) - y) ** 2))
    print(f"  held-out loss of the restored weights: {loss:.6f}")
    print(pc.metadata(path).leaves["params/hidden/kernel"])
    np.testing.assert_array_equal(params["out"]["bias"], state.params["out"]["bias"])


if __name__ == "__main__":
    main()
