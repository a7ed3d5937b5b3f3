import functools
import inspect

import pytree_ckpt as pc

DOCUMENTED = {
    "save", "save_async", "save_in_jit", "restore", "metadata", "SaveFuture", "RestoreStatus",
    "Mismatch", "Cast",
    "CheckpointMetadata", "LeafMetadata", "CheckpointError", "CheckpointNotFoundError",
    "IncompleteCheckpointError", "CheckpointExistsError", "NotACheckpointError",
    "CorruptCheckpointError", "FormatVersionError", "UnsupportedLeafError", "PathCollisionError",
    "PathNotFoundError", "SaveError", "ShardingError", "CheckpointManager", "latest", "LockedError",
    "PartialRestoreError",
    "save_safetensors", "verify", "VerifyReport", "clean", "CleanReport",
    "read_blocks", "RegionError", "StorageError", "ConfigurationError", "configure",
    "DistributedError", "OverwrittenError", "join_path", "split_path",
    "TransformError",
}


def test_exported_names_are_exactly_the_documented_ones():
    assert set(pc.__all__) == DOCUMENTED
    assert all(hasattr(pc, name) for name in pc.__all__)
    public = {n for n in dir(pc) if not n.startswith("_") and not inspect.ismodule(getattr(pc, n))}
    assert public == set(pc.__all__)


def test_every_public_function_has_a_docstring_with_an_example():
    for name in pc.__all__:
        obj = getattr(pc, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and ("Example" in obj.__doc__ or ">>>" in obj.__doc__), name


def test_errors_also_derive_from_fitting_builtins():
    assert issubclass(pc.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(pc.CheckpointExistsError, FileExistsError)
    assert issubclass(pc.CorruptCheckpointError, ValueError)
    assert issubclass(pc.FormatVersionError, pc.CorruptCheckpointError)
    assert issubclass(pc.UnsupportedLeafError, TypeError)
    assert issubclass(pc.PartialRestoreError, AssertionError)
    assert issubclass(pc.ShardingError, ValueError)
    assert issubclass(pc.RegionError, IndexError)
    assert issubclass(pc.TransformError, ValueError)
    assert issubclass(pc.StorageError, OSError)
    assert not issubclass(pc.StorageError, FileNotFoundError | ValueError)
    assert issubclass(pc.ConfigurationError, ValueError)
    assert issubclass(pc.DistributedError, pc.SaveError)
    assert issubclass(pc.OverwrittenError, pc.CorruptCheckpointError)
    assert all(issubclass(getattr(pc, n), pc.CheckpointError)
               for n in pc.__all__ if n.endswith("Error") and n != "CheckpointError")


def test_public_records_share_one_vocabulary():
    """One field name per concept across every public record: a location is ``path``, the
    commit file's version ``format_version``, ``leaves`` a mapping by path, a count ``*_count``."""
    import dataclasses

    fields = {
        "VerifyReport": pc.VerifyReport._fields,
        "CleanReport": pc.CleanReport._fields,
        "LeafMetadata": pc.LeafMetadata._fields,
        "Mismatch": pc.Mismatch._fields,
        "Cast": pc.Cast._fields,
        "CheckpointMetadata": tuple(f.name for f in dataclasses.fields(pc.CheckpointMetadata)),
        "RestoreStatus": tuple(f.name for f in dataclasses.fields(pc.RestoreStatus)),
    }
    assert fields["VerifyReport"] == ("path", "format_version", "leaf_count", "bytes_read",
                                      "problems")
    assert fields["CleanReport"] == ("path", "incomplete", "orphaned", "kept", "deleted")
    assert fields["CheckpointMetadata"][:2] == ("path", "format_version")
    # `tree` is a cached property built on first use (metadata() of a large tree need not
    # build it), not a field.
    assert "tree" not in fields["CheckpointMetadata"]
    assert isinstance(inspect.getattr_static(pc.CheckpointMetadata, "tree"), functools.cached_property)
    assert fields["LeafMetadata"][0] == "path"
    every = {f for names in fields.values() for f in names}
    assert not every & {"version", "directory", "url", "location", "leaf_paths"}
    assert [r for r, names in fields.items() if "leaves" in names] == ["CheckpointMetadata"]
    assert list(inspect.signature(pc.clean).parameters) == ["path", "delete"]


def test_the_errors_module_docstring_lists_exactly_the_exported_errors():
    import re

    from pytree_ckpt import _errors

    listed = re.findall(r"(?:├──|└──)\s+(\w+Error)\b", _errors.__doc__)
    exported = [n for n in pc.__all__ if n.endswith("Error") and n != "CheckpointError"]
    assert sorted(listed) == sorted(exported)
    defined = [n for n, v in vars(_errors).items()
               if isinstance(v, type) and issubclass(v, pc.CheckpointError)]
    assert sorted(defined) == sorted(exported + ["CheckpointError"])
    for line in _errors.__doc__.splitlines():  # each under the parent it derives from
        match = re.search(r"^ {4}│   (?:├──|└──) (\w+)", line)
        if match:
            assert getattr(pc, match[1]).__bases__[0].__name__ in {
                "CorruptCheckpointError", "SaveError"}, line
