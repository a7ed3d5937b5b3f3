"""The readers of other tools' files import none of those tools, and pickle nothing.

Files are written here by the real writers (orbax-checkpoint, flax, safetensors); a child
process that has never imported them restores and describes each file, with pickle's
loaders made to raise, and must end without any of those packages in ``sys.modules``.
"""

import json
import subprocess
import sys
import textwrap

import flax.serialization
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

CHILD = textwrap.dedent(r'''
    import json, pickle, sys
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")
    pickle.load = pickle.loads = refuse
    import pytree_ckpt as pc
    formats = {}
    for path in sys.argv[1:]:
        tree, status = pc.restore(path)
        formats[path] = [pc.metadata(path).format, len(status.matched)]
    tools = sorted(m for m in sys.modules if m.split(".")[0] in ("orbax", "flax", "safetensors"))
    print(json.dumps({"formats": formats, "tools": tools}))
''')


def test_readers_import_none_of_the_writers(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3), "step": 4}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", tree)
    checkpointer.wait_until_finished()
    (tmp_path / "state.msgpack").write_bytes(flax.serialization.to_bytes(tree))
    save_file({"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)},
              str(tmp_path / "model.safetensors"))
    paths = [str(tmp_path / name) for name in ("orbax", "state.msgpack", "model.safetensors")]
    done = subprocess.run([sys.executable, "-c", CHILD, *paths], capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["formats"] == {paths[0]: ["orbax", 3], paths[1]: ["flax_msgpack", 3],
                                 paths[2]: ["safetensors", 2]}
    assert result["tools"] == []
