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
