"""``python -m pytree_ckpt``: the ``pytree-ckpt`` command line (see _cli.py)."""

from ._cli import main

if __name__ == "__main__":  # importing the module (as doctest's discovery does) runs nothing
    raise SystemExit(main())
