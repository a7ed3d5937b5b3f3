"""pytree-ckpt convert: leaves chosen by --only/--exclude, safetensors' __metadata__ kept or its
drop reported, and errors that name the command's flags."""

import json

import jax
import numpy as np
import pytest
import safetensors

import pytree_ckpt as pc
from pytree_ckpt._cli import main


def _nnx_like_state():
    """An NNX-style state: params, plus RNG keys and counts (typed keys: no safetensors)."""
    return {"params": {"layers": [{"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
                                  {"kernel": np.ones((3, 3), np.float32)}],
                       "bias": np.zeros(3, np.float32)},
            "rngs": {"dropout": {"key": jax.random.key(0), "count": np.uint32(4)}}}


def test_exclude_and_only_choose_the_leaves(tmp_path, capsys):
    src = pc.save(_nnx_like_state(), tmp_path / "state")
    out = tmp_path / "model.safetensors"
    assert main(["convert", src, str(out)]) == 2  # the RNG key blocks the export...
    assert "--exclude REGEX" in capsys.readouterr().err
    assert main(["convert", src, str(out), "--exclude", "^rngs/"]) == 0  # ...unless left out
    assert "2 leaves left out" in capsys.readouterr().out
    with safetensors.safe_open(str(out), "numpy") as f:
        assert sorted(f.keys()) == ["params.bias", "params.layers.0.kernel",
                                    "params.layers.1.kernel"]
        np.testing.assert_array_equal(f.get_tensor("params.layers.1.kernel"), np.ones((3, 3)))
    # --only keeps what matches any of its patterns; --exclude then takes away. A list that
    # lost an element keeps its indices (as a dict), so paths do not shift.
    assert main(["--json", "convert", src, str(tmp_path / "some"), "--only", "kernel",
                 "--only", "count", "--exclude", "layers/0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["leaf_count"] == 2 and sorted(report["left_out"]) == [
        "params/bias", "params/layers/0/kernel", "rngs/dropout/key"]
    tree, _ = pc.restore(tmp_path / "some")
    assert tree == {"params": {"layers": {"1": {"kernel": tree["params"]["layers"]["1"]["kernel"]}}},
                    "rngs": {"dropout": {"count": 4}}}
    assert pc.metadata(tmp_path / "some").leaves["params/layers/1/kernel"].shape == (3, 3)
    assert main(["convert", src, str(tmp_path / "none"), "--only", "nothing"]) == 2
    assert "--only/--exclude leave none of its 5 leaves" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bad pattern is a usage error, named
        main(["convert", src, str(tmp_path / "x"), "--exclude", "rngs("])
    assert "argument --exclude: not a regular expression: 'rngs('" in capsys.readouterr().err


def test_safetensors_metadata_is_kept_or_its_drop_reported(tmp_path, capsys):
    weights = {"a.kernel": np.arange(4, dtype=np.float32), "b": np.ones(2, np.int32)}
    src = pc.save_safetensors(weights, tmp_path / "hf.safetensors",
                              metadata={"format": "pt", "note": "x"})
    # safetensors -> safetensors keeps it.
    assert main(["convert", src, str(tmp_path / "copy.safetensors")]) == 0
    capsys.readouterr()
    with safetensors.safe_open(str(tmp_path / "copy.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        np.testing.assert_array_equal(f.get_tensor("a.kernel"), weights["a.kernel"])
    assert main(["convert", src, str(tmp_path / "b.safetensors"), "--exclude", "^b$"]) == 0
    assert pc.metadata(tmp_path / "b.safetensors").writer["metadata"] == {"format": "pt",
                                                                            "note": "x"}
    capsys.readouterr()
    # safetensors -> ours: ours has no place for it, and says so.
    assert main(["convert", src, str(tmp_path / "ours")]) == 0
    err = capsys.readouterr().err
    assert "the safetensors __metadata__ (format, note) is not in" in err
    assert main(["--json", "convert", src, str(tmp_path / "ours2")]) == 0
    assert json.loads(capsys.readouterr().out)["metadata_dropped"] == {"format": "pt",
                                                                      "note": "x"}
    # ours -> safetensors -> ours gives back the same arrays.
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "back.safetensors"), str(tmp_path / "again")]) == 0
    assert "__metadata__" not in capsys.readouterr().err  # nothing to drop this time
    again, status = pc.restore(tmp_path / "again")
    status.assert_consumed()
    np.testing.assert_array_equal(again["a"]["kernel"], weights["a.kernel"])
    np.testing.assert_array_equal(again["b"], weights["b"])


def test_errors_name_the_flags(tmp_path, capsys):
    src = pc.save({"params": {"w": np.ones(2, np.float32)}}, tmp_path / "src")
    for dst in (tmp_path / "dst", tmp_path / "dst.safetensors"):
        assert main(["convert", src, str(dst), "--at", "params"]) == 0
        assert main(["convert", src, str(dst), "--at", "params"]) == 2
        err = capsys.readouterr().err
        assert "--overwrite" in err and "overwrite=True" not in err
        assert main(["convert", src, str(dst), "--at", "params", "--overwrite"]) == 0
    assert main(["convert", src, str(tmp_path / "x"), "--at", "opt"]) == 2
    err = capsys.readouterr().err
    assert "--at opt names nothing" in err and "at='opt'" not in err
