"""Training loops that test_manager.py runs in child processes (and imports, for the model).

    python _manager_child.py train DIRECTORY TOTAL HANG_AFTER
        resume from the latest step and train to TOTAL, saving every step; once step
        HANG_AFTER is committed print "ready" and sleep, to be killed.
    python _manager_child.py preempt DIRECTORY
        train forever with handle_preemption=True, printing "step N"; on SIGTERM the next
        save is forced, then print "preempted N" and exit 0.
    python _manager_child.py unclosed DIRECTORY
        save steps 1-3 with keep=1 in the background and exit without closing the manager.
    python _manager_child.py crash DIRECTORY
        commit step 1, then die by SIGKILL inside the save of step 2, after its data is
        written and before its commit file.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp

import pytree_ckpt as pc


def init_state() -> dict:
    return {"params": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)},
            "mu": jnp.zeros((4, 3)), "key": jax.random.key(0), "step": 0}


def train_step(state: dict) -> dict:
    key, sub = jax.random.split(state["key"])
    grad = jax.random.normal(sub, (4, 3))
    mu = 0.9 * state["mu"] + 0.1 * grad
    w = state["params"]["w"] - 0.01 * mu
    return {"params": {"w": w, "b": state["params"]["b"] + w.sum(0)}, "mu": mu, "key": key,
            "step": state["step"] + 1}


def train(directory: str, total: int, hang_after: int = -1) -> dict:
    """The loop of the manager's docstring: resume, train, save every step."""
    with pc.CheckpointManager(directory, keep=2) as mgr:
        start = mgr.latest_step()
        if start is None:
            state, start = init_state(), 0
        else:
            state, status = mgr.restore(start, init_state())
            status.assert_consumed()
        for step in range(start + 1, total + 1):
            state = train_step(state)
            mgr.save(step, state, metrics={"w_norm": jnp.linalg.norm(state["params"]["w"])})
            if step == hang_after:
                mgr.wait()
                print("ready", flush=True)
                time.sleep(600)
    return state


def preempt(directory: str) -> None:
    with pc.CheckpointManager(directory, save_interval_steps=1000,
                              handle_preemption=True) as mgr:
        state = init_state()
        for step in range(1, 10**6):
            state = train_step(state)
            mgr.save(step, state)
            if mgr.preempted:
                print("preempted", step, flush=True)
                break
            print("step", step, flush=True)
            time.sleep(0.01)


def crash(directory: str) -> None:
    mgr = pc.CheckpointManager(directory, async_save=False)
    state = train_step(init_state())
    mgr.save(1, state, metrics={"loss": 1.0})
    # Die as a power cut would: after step 2's data is written, before its commit file is.
    pc._format.encode = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    mgr.save(2, train_step(state), metrics={"loss": 0.5})


def unclosed(directory: str) -> None:
    mgr = pc.CheckpointManager(directory, keep=1)
    for step in (1, 2, 3):
        mgr.save(step, {"x": jnp.full(1000, step)})


if __name__ == "__main__":
    mode, directory, *rest = sys.argv[1:]
    if mode == "train":
        train(directory, *map(int, rest))
    elif mode == "preempt":
        preempt(directory)
    elif mode == "unclosed":
        unclosed(directory)
    else:
        crash(directory)
