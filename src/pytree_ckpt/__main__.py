"""``python -m pytree_ckpt``: the ``pytree-ckpt`` command line (see _cli.py)."""

from ._cli import main

raise SystemExit(main())
