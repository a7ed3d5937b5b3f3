"""No pickle, no eval/exec, nothing imported from checkpoint content.

A child process imports pytree_ckpt, JAX and NumPy, runs one warm-up save/restore/metadata
(so that lazy imports of the code paths themselves are done), then makes ``pickle.load``,
``pickle.loads``, ``pickle.Unpickler``, ``builtins.eval``, ``builtins.exec``,
``importlib.import_module`` and any import of a module not imported yet raise, and saves,
restores (with and without a target) and describes a tree with every leaf kind, plus a
checkpoint whose node type names are ``os.system``, ``builtins.eval``... A static check
keeps those names out of ``src/`` too.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(r'''
    import builtins, dataclasses, importlib, pickle, sys, typing, zlib
    import jax, jax.numpy as jnp, ml_dtypes, msgpack, numpy as np
    import pytree_ckpt as pc

    root = sys.argv[1]

    class Pair(typing.NamedTuple):
        a: object
        b: object

    @dataclasses.dataclass
    class system:  # its type name in the checkpoint is "os.system"
        x: object
    system.__module__ = "os"
    jax.tree_util.register_dataclass(system, data_fields=["x"], meta_fields=[])

    def tree():
        return {
            "jax": jnp.arange(70000, dtype=jnp.bfloat16), "small": jnp.ones(3, jnp.int8),
            "np": np.arange(6.0).reshape(2, 3), "big_np": np.ones((300, 300), np.float32),
            "scalar": np.float16(1.5), "f8": np.ones(4, ml_dtypes.float8_e4m3fn),
            "key": jax.random.key(0), "zero": np.zeros((0, 3)), "d0": jnp.float32(2),
            "py": [None, True, 3, 2**80, 0.25, 1j, "s", b"b"],
            "nodes": (Pair(1, 2), system(x=np.ones(2)), {"": {"/": 1}}),
        }

    def round_trip(path, overwrite=False):
        t = tree()
        pc.save(t, path, overwrite=overwrite)
        pc.save_async(t, path + "-async", overwrite=overwrite).result()
        restored, status = pc.restore(path, t)
        status.assert_consumed()
        plain, _ = pc.restore(path)
        assert plain["nodes"][1] == {"x": plain["nodes"][1]["x"]}  # a dict, never os.system
        info = pc.metadata(path)
        assert info.node_types["nodes/1"] == "os.system", info.node_types
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(t), strict=True):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) if hasattr(a, "dtype") else 0:
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert np.array_equal(np.asarray(a), np.asarray(b)) if hasattr(a, "shape") else a == b

    round_trip(root + "/warm")  # lazy imports of the library's own code paths happen here
    mgr = pc.CheckpointManager(root + "/mgr_warm")
    mgr.save(1, tree()); mgr.wait()
    mgr.restore(1); mgr.close()

    # A forged checkpoint naming dangerous types for every node.
    pc.save(tree(), root + "/forged")
    raw = open(root + "/forged/checkpoint.msgpack", "rb").read()
    magic, version, _, body = msgpack.unpackb(raw)
    body = msgpack.unpackb(body)
    names = ["os.system", "builtins.eval", "subprocess.Popen", "pickle.loads",
             "__main__.__import__", "evil_module_that_does_not_exist.Thing"]
    for i, node in enumerate(body["nodes"]):
        node[2] = names[i % len(names)]
    body = msgpack.packb(body, use_bin_type=True)
    with open(root + "/forged/checkpoint.msgpack", "wb") as f:
        f.write(msgpack.packb([magic, version, zlib.crc32(body), body], use_bin_type=True))

    calls = []
    def forbidden(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"pytree_ckpt called {name}")
        return f
    pickle.loads = forbidden("pickle.loads")
    pickle.load = forbidden("pickle.load")
    pickle.Unpickler = forbidden("pickle.Unpickler")
    builtins.eval = forbidden("eval")
    builtins.exec = forbidden("exec")
    importlib.import_module = forbidden("importlib.import_module")
    real_import = builtins.__import__
    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name not in sys.modules:
            calls.append("import " + name)
            raise ImportError(f"pytree_ckpt imported a new module {name!r}")
        return real_import(name, globals, locals, fromlist, level)
    builtins.__import__ = guarded_import

    round_trip(root + "/main")
    round_trip(root + "/main", overwrite=True)
    mgr = pc.CheckpointManager(root + "/mgr", keep=1)
    for step in (1, 2):
        mgr.save(step, tree())
    mgr.close()
    mgr = pc.CheckpointManager(root + "/mgr")
    assert mgr.latest_step() == 2
    mgr.restore(2, tree())[1].assert_consumed()
    mgr.close()
    plain, _ = pc.restore(root + "/forged")
    assert isinstance(plain, dict) and isinstance(plain["nodes"][1], dict)
    info = pc.metadata(root + "/forged")
    assert "os.system" in info.node_types.values(), info.node_types
    assert not calls, calls
    print("OK")
''')


def test_no_pickle_eval_exec_or_imports_at_run_time(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]


def test_source_has_no_pickle_eval_exec_or_dynamic_import():
    # Names in code, not in docstrings or comments (which say "pickle is never used").
    banned = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "eval", "exec",
              "__import__", "import_module", "literal_eval"}
    hits = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        with open(path, "rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type == tokenize.NAME and tok.string in banned:
                    hits.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.line.strip()}")
    assert not hits, "\n".join(hits)
