"""In a notebook, metadata() renders the tree as collapsible HTML: inner nodes as <details>
with their leaf count and bytes, leaves in tables titled with their full paths."""

import re

import jax.numpy as jnp

import pytree_ckpt as pc


def test_the_tree_view_nests_nodes_with_counts_and_sizes():
    tree = {"params": {"hidden": {"kernel": jnp.ones((4, 32)), "bias": jnp.zeros(32)},
                       "out": {"kernel": jnp.ones((32, 1))}}, "step": 3}
    pc.save(tree, "memory://html/c")
    page = pc.metadata("memory://html/c")._repr_html_()
    summaries = re.findall(r"<summary>(.*?)</summary>", page)
    assert summaries == [
        "<b>checkpoint memory://html/c: 4 leaves, 768 bytes, written by pytree_ckpt "
        f"{pc.__version__}</b>",
        "<code>params</code> (3 leaves, 768 bytes)",
        "<code>hidden</code> (2 leaves, 640 bytes)",
        "<code>out</code> (1 leaves, 128 bytes)"]
    assert page.count("<details open>") == 2  # the whole and the first level
    assert ("<tr><td><code title='params/hidden/kernel'>kernel</code></td><td>jax</td>"
            "<td>float32</td><td>[4, 32]</td><td>512</td><td></td><td></td></tr>") in page
    assert "<code title='step'>step</code></td><td>py</td><td>int</td><td>[]</td><td>0</td>" \
           "<td></td><td>3</td>" in page


def test_a_deep_tree_renders_with_its_deep_part_flat():
    deep: dict = {"leaf": 1}
    for i in range(900):
        deep = {f"n{i}": deep}
    pc.save(deep, "memory://html/deep")
    page = pc.metadata("memory://html/deep")._repr_html_()
    assert page.count("<details") == 1 + 64
    path = "/".join(f"n{i}" for i in reversed(range(900))) + "/leaf"
    assert f"<code title='{path}'>{path}</code>" in page
