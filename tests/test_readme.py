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
