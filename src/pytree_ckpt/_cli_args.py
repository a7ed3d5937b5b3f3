"""The ``pytree-ckpt`` command line's arguments: every command, its flags and their types."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping

from ._convert import pattern

# diff --values holds about two blocks of this size (--block-bytes): a larger leaf is read
# block by block from each side, smaller ones in batches of about a block a side.
BLOCK_BYTES = 64 << 20


def parser(run: Mapping[str, Callable[..., int]]) -> argparse.ArgumentParser:
    """The ``pytree-ckpt`` parser; each command's ``args.run`` is ``run[command]``."""
    # --json before or after the command; the command's copy does not reset the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document instead of a table")
    parser = argparse.ArgumentParser(
        prog="pytree-ckpt", description="Inspect, compare and list pytree_ckpt checkpoints.",
        epilog="exit status: 0 fine; 1 differences or corruption found; 2 bad usage or "
               "nothing there; 3 the storage could not be read or written. Paths may be local, "
               "file://, gs:// or s3:// (as for save).")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    ls = commands.add_parser("ls", parents=[common], help="list a checkpoint's leaves",
                             description="List a checkpoint's leaves and their totals.")
    ls.add_argument("path", metavar="PATH", help="a checkpoint")
    ls.add_argument("pattern", metavar="PATTERN", nargs="?",
                    help="only leaves whose path matches this glob, or lies under this path "
                         "(e.g. 'params', '*/kernel')")
    ls.set_defaults(run=run["ls"])

    diff = commands.add_parser(
        "diff", parents=[common], help="compare two checkpoints",
        description="Paths only in A, only in B, or of another kind, shape or dtype, and "
                    "Python values that differ; arrays by the checksums both commit files "
                    "record where they can be compared (ours, of the same chunking), else "
                    "'values not compared'; with --values, every array read, and by how much "
                    "it differs. Exit status 1 if any difference is found.")
    diff.add_argument("a", metavar="A", help="a checkpoint")
    diff.add_argument("b", metavar="B", help="another checkpoint")
    diff.add_argument("--at-a", metavar="PREFIX", default=None,
                      help="compare only A's leaves under this path, relative to it (e.g. "
                           "'default' for an Orbax CheckpointManager step)")
    diff.add_argument("--at-b", metavar="PREFIX", default=None,
                      help="the same for B")
    diff.add_argument("--values", action="store_true",
                      help="also read and compare the arrays (block by block, bounded memory)")
    diff.add_argument("--block-bytes", type=byte_count, default=BLOCK_BYTES, metavar="N",
                      help="with --values, read at most about N bytes a side at a time: a "
                           "larger array block by block (e.g. 16M, 1G; default 64M)")
    diff.add_argument("--atol", type=non_negative, default=0.0,
                      help="absolute tolerance for --values (default 0: exact)")
    diff.add_argument("--rtol", type=non_negative, default=0.0,
                      help="relative tolerance for --values, of B's value (default 0)")
    diff.set_defaults(run=run["diff"])

    verify = commands.add_parser(
        "verify", parents=[common], help="check every byte of a checkpoint",
        description="Read every byte of a checkpoint and check every checksum and what binds "
                    "each chunk to its commit (pytree_ckpt.verify); name every bad leaf. Exit "
                    "status 1 on any problem.")
    verify.add_argument("path", metavar="PATH", help="a pytree_ckpt checkpoint")
    verify.set_defaults(run=run["verify"])

    steps = commands.add_parser(
        "steps", parents=[common], help="list a CheckpointManager directory's steps",
        description="The committed steps of a CheckpointManager's directory: time, size, "
                    "metrics; besides them, incomplete saves, and the folders of deleted steps "
                    "kept for the data later steps carry (retired). Reads only: takes no "
                    "lock, deletes nothing.")
    steps.add_argument("directory", metavar="DIR", help="a CheckpointManager's directory")
    steps.add_argument("--best", metavar="METRIC",
                       help="mark the step with the highest (--min: lowest) METRIC")
    steps.add_argument("--min", action="store_true", help="the best METRIC is the lowest")
    steps.set_defaults(run=run["steps"])

    convert = commands.add_parser(
        "convert", parents=[common], help="convert a checkpoint to another format",
        description="Read SRC (ours, Orbax, Flax msgpack or safetensors) and write it to DST "
                    "as a pytree_ckpt checkpoint, or as one safetensors file if DST ends in "
                    ".safetensors (or with --to). The tree is held in memory meanwhile.")
    convert.add_argument("src", metavar="SRC", help="a checkpoint of any format restore reads")
    convert.add_argument("dst", metavar="DST", help="where to write")
    convert.add_argument("--at", metavar="P", help="convert only the subtree at this path "
                                                   "(e.g. params)")
    convert.add_argument("--to", choices=("pytree_ckpt", "safetensors"),
                         help="DST's format (default: from DST's name)")
    convert.add_argument("--only", metavar="REGEX", type=pattern, action="append", default=[],
                         help="only the leaves whose path (under --at) matches; repeatable")
    convert.add_argument("--exclude", metavar="REGEX", type=pattern, action="append", default=[],
                         help="leave out the leaves whose path matches (e.g. rngs); repeatable")
    convert.add_argument("--overwrite", action="store_true", help="replace what is at DST")
    convert.set_defaults(run=run["convert"])

    clean = commands.add_parser(
        "clean", parents=[common], help="remove what interrupted saves left behind",
        description="List the incomplete saves and orphaned generations in a checkpoint or a "
                    "CheckpointManager's directory (pytree_ckpt.clean); delete them with --yes. "
                    "Leftovers young enough to be a save still writing are kept.")
    clean.add_argument("directory", metavar="DIR", help="a checkpoint or a manager's directory")
    clean.add_argument("--yes", action="store_true", help="delete what is listed")
    clean.set_defaults(run=run["clean"])
    return parser


def byte_count(text: str) -> int:
    """``text`` as a positive count of bytes: digits, with K, M or G for KiB, MiB, GiB."""
    match = re.fullmatch(r"(\d+)([kmg]?)(i?b)?", text.strip().lower())
    if not match or not int(match[1]):
        raise argparse.ArgumentTypeError(f"not a positive size such as 4096 or 64M: {text!r}")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2]]


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value
