"""save_in_jit: saving from inside jitted training steps through an ordered io_callback."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pytree_ckpt as pc
from pytree_ckpt import _distributed

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")


def _init():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((64, 32), np.float32)),
            "b": jnp.zeros(32, jnp.bfloat16), "step": jnp.int32(0)}


def _update(state):
    return {"w": state["w"] * 0.5 + 1.0, "b": state["b"] + 1, "step": state["step"] + 1}


def _expected_states(n):
    states, state = [], jax.tree.map(np.asarray, _init())
    for _ in range(n):
        states.append(state)
        state = jax.tree.map(np.asarray, _update(state))
    return states


def _check_saved(directory, expected_steps, states):
    assert sorted(os.listdir(directory)) == [f"step_{s:03d}" for s in expected_steps]
    for s in expected_steps:
        tree, status = pc.restore(os.path.join(directory, f"step_{s:03d}"))
        assert status.matched == ("b", "step", "w")
        for name, value in states[s].items():
            assert isinstance(tree[name], jax.Array)
            np.testing.assert_array_equal(np.asarray(tree[name]), value)


@pytest.mark.parametrize("donate", [False, True], ids=["kept", "donated"])
def test_saves_exactly_every_kth_step_of_a_jitted_loop(tmp_path, donate):
    k, n = 3, 8

    def step(state):
        jax.lax.cond(state["step"] % k == 0,
                     lambda: pc.save_in_jit(state, "{dir}/step_{step:03d}",
                                            {"dir": str(tmp_path), "step": state["step"]}),
                     lambda: None)
        return _update(state)

    train_step = jax.jit(step, donate_argnums=0 if donate else ())
    state = _init()
    for _ in range(n):
        old, state = state, train_step(state)
        if donate:
            assert old["w"].is_deleted()
    jax.effects_barrier()
    _check_saved(tmp_path, [0, 3, 6], _expected_states(n))


def test_saves_from_a_scan_inside_one_computation(tmp_path):
    def body(state, _):
        jax.lax.cond(state["step"] % 2 == 1,
                     lambda: pc.save_in_jit(state, str(tmp_path) + "/step_{step:03d}",
                                            {"step": state["step"]}),
                     lambda: None)
        return _update(state), None

    run = jax.jit(lambda s: jax.lax.scan(body, s, length=6)[0], donate_argnums=0)
    final = run(_init())
    jax.block_until_ready(final)
    jax.effects_barrier()
    _check_saved(tmp_path, [1, 3, 5], _expected_states(6))


def test_sharded_state_under_jit(tmp_path):
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    state = _init()
    state["w"] = jax.device_put(state["w"], NamedSharding(mesh, P("x", "y")))
    state["b"] = jax.device_put(state["b"], NamedSharding(mesh, P("y")))

    def step(state):
        jax.lax.cond(state["step"] % 2 == 0,
                     lambda: pc.save_in_jit(state, str(tmp_path / "step_{step:03d}"),
                                            {"step": state["step"]}),
                     lambda: None)
        return _update(state)

    train_step = jax.jit(step, donate_argnums=0)
    for _ in range(3):
        state = train_step(state)
    jax.effects_barrier()
    _check_saved(tmp_path, [0, 2], _expected_states(3))
    # Restored onto a sharding of our choosing.
    target = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32,
                                        sharding=NamedSharding(mesh, P(None, "x")))}
    tree, _ = pc.restore(tmp_path / "step_002", target)
    assert tree["w"].sharding == target["w"].sharding
    np.testing.assert_array_equal(np.asarray(tree["w"]), _expected_states(3)[2]["w"])


def test_keys_python_leaves_and_float_fields(tmp_path):
    @jax.jit
    def step(key, x, lr):
        # Python leaves are not traced: they are captured at trace time and saved as is.
        state = {"key": key, "note": "hello", "count": 3, "none": None, "x": x}
        pc.save_in_jit(state, str(tmp_path) + "/{name}_{lr:.2f}", {"name": "run", "lr": lr})

    key = jax.random.key(7, impl="rbg")
    step(key, jnp.arange(3), jnp.float32(0.25))
    jax.effects_barrier()
    tree, status = pc.restore(tmp_path / "run_0.25")
    assert status.matched == ("count", "key", "none", "note", "x")
    assert tree["note"] == "hello" and tree["count"] == 3 and tree["none"] is None
    assert jax.random.key_impl(tree["key"]) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(tree["key"]), jax.random.key_data(key))
    np.testing.assert_array_equal(tree["x"], np.arange(3))


def test_template_errors_are_raised_at_trace_time(tmp_path):
    state = {"x": jnp.ones(2), "step": jnp.int32(0)}
    with pytest.raises(ValueError, match=r"names \['step'\] but the fields given are \[\]"):
        jax.jit(lambda s: pc.save_in_jit(s, "ckpt/{step}"))(state)
    with pytest.raises(ValueError, match="cannot be filled"):
        jax.jit(lambda s: pc.save_in_jit(s, "ckpt/{step:q}", {"step": s["step"]}))(state)
    with pytest.raises(ValueError, match="names"):
        jax.jit(lambda s: pc.save_in_jit(s, "ckpt/{}"))(state)
    with pytest.raises(TypeError, match="field 'step' has shape \\(2,\\); path fields must"):
        jax.jit(lambda s: pc.save_in_jit(s, "ckpt/{step}", {"step": s["x"]}))(state)
    with pytest.raises(TypeError, match="path must be a str template"):
        jax.jit(lambda s: pc.save_in_jit(s, tmp_path / "c"))(state)
    with pytest.raises(TypeError, match="fields must be a mapping of str names"):
        jax.jit(lambda s: pc.save_in_jit(s, "ckpt/{step}", [("step", s["step"])]))(state)


def test_a_field_may_take_any_name_even_an_options(tmp_path):
    """The fields are a mapping of their own: fields called overwrite, path and tree fill the
    template and are never taken for save_in_jit's own arguments (nor the reverse)."""
    pc.save({"old": 1}, tmp_path / "existing")

    @jax.jit
    def step(state):
        pc.save_in_jit(state, str(tmp_path) + "/{overwrite}_{step}_{path}_{tree}",
                       {"overwrite": "no", "step": state["step"], "path": "p", "tree": "t"})
        pc.save_in_jit(state, str(tmp_path / "{name}"), {"name": "existing"}, overwrite=True)

    step({"w": jnp.arange(2.0), "step": jnp.int32(1)})
    jax.effects_barrier()
    assert sorted(os.listdir(tmp_path)) == ["existing", "no_1_p_t"]
    for name in ("no_1_p_t", "existing"):
        tree, status = pc.restore(tmp_path / name)
        assert status.matched == ("step", "w") and int(tree["step"]) == 1
    with pytest.raises(TypeError, match="step"):
        pc.save_in_jit({"w": 1}, "ckpt/{step}", step=1)  # fields are no longer keywords


def test_refuses_to_run_in_a_multiprocess_job(monkeypatch):
    monkeypatch.setattr(_distributed, "is_multiprocess", lambda: True)
    monkeypatch.setattr(_distributed, "process_count", lambda: 2)
    with pytest.raises(pc.SaveError, match="single process only.*2 processes"):
        jax.jit(lambda x: pc.save_in_jit(x, "ckpt"))(jnp.ones(2))


def test_a_failing_save_surfaces_from_the_step(tmp_path):
    # In a subprocess: a failed ordered callback poisons the process's effect tokens.
    script = f"""
        import jax, jax.numpy as jnp
        import pytree_ckpt as pc
        pc.save({{"x": 1}}, {str(tmp_path / "c")!r})
        step = jax.jit(lambda x: pc.save_in_jit(x, {str(tmp_path / "c")!r}))
        try:
            step(jnp.ones(2))
            jax.effects_barrier()
        except Exception as e:
            print(type(e).__name__, "CheckpointExistsError" in str(e), flush=True)
        """
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["JaxRuntimeError True"], proc.stderr
    assert pc.restore(tmp_path / "c")[0] == {"x": 1}  # the existing checkpoint is intact
