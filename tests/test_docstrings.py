"""Every example in a docstring runs and prints what it says (a drifted docstring is a bug)."""

import doctest
import importlib
import pkgutil

import jax.numpy as jnp

import pytree_ckpt as pc


def test_docstring_examples():
    # Some examples read the checkpoint an earlier one wrote (metadata() shows what save()
    # wrote to memory://doc/save), so _save's run first, once, in one process.
    # Every module, those of subpackages (_foreign) included.
    names = sorted(m.name for m in pkgutil.walk_packages(pc.__path__, "pytree_ckpt."))
    names.sort(key=lambda n: n != "pytree_ckpt._save")
    failed, attempted = {}, 0
    for name in names:
        module = importlib.import_module(name)
        result = doctest.testmod(module, extraglobs={"pc": pc, "jnp": jnp},
                                 optionflags=doctest.ELLIPSIS, report=True)
        attempted += result.attempted
        if result.failed:
            failed[name] = result.failed
    assert not failed, failed
    assert attempted >= 20
