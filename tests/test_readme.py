"""The README's quickstart runs as written (with its /tmp paths moved into a test folder)."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_quickstart_runs(tmp_path, capsys):
    text = README.read_text()
    block = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    exec(compile(code.replace("/tmp/ckpt", str(tmp_path)), "README quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path}/100: 3 leaves" in out
    assert "params/dense/kernel: jax float32[4, 2] (32 B)" in out


def test_readme_shows_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_the_architecture_table_names_every_module_and_only_those():
    # The README draws the layout; a module added, renamed or deleted must change it too.
    package = README.parent / "src" / "pytree_ckpt"
    modules = {p.stem for p in package.glob("_*.py")} - {"__init__", "__main__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    section = README.read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(_[a-z_]+)[`/]", section)) - {"__init__"}
    assert named == modules, (sorted(modules - named), sorted(named - modules))


def test_the_orbax_migration_table_names_what_both_libraries_have():
    """Each name in the README's Orbax table exists: Orbax's in the installed orbax-checkpoint,
    ours on pc.CheckpointManager."""
    import dataclasses
    import inspect

    import orbax.checkpoint as ocp

    import pytree_ckpt as pc

    table = README.read_text().split("**Coming from Orbax.**", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 15

    def names(cell: str) -> tuple[set[str], set[str]]:
        code = " ".join(re.findall(r"`([^`]*)`", cell))
        return set(re.findall(r"mgr\.(\w+)", code)), set(re.findall(r"\b(\w+)=", code))

    orbax_options = ({f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}
                     | set(inspect.signature(ocp.CheckpointManager).parameters))
    ours = set(inspect.signature(pc.CheckpointManager).parameters)
    for orbax_cell, our_cell in ((r[0], r[1]) for r in rows):
        methods, options = names(orbax_cell)
        assert all(hasattr(ocp.CheckpointManager, m) for m in methods), orbax_cell
        save_restore = set(inspect.signature(ocp.CheckpointManager.save).parameters)
        assert options <= orbax_options | save_restore, orbax_cell
        methods, options = names(our_cell)
        assert all(hasattr(pc.CheckpointManager, m) for m in methods), our_cell
        mine = (ours | set(inspect.signature(pc.CheckpointManager.save).parameters)
                | set(inspect.signature(pc.CheckpointManager.restore).parameters))
        assert options <= mine, our_cell
