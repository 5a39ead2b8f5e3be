"""The README's Python examples run as written (in order, sharing one namespace); what it says
about the examples' data, threads, checkpoints and quick folders is what the code does."""

import os
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    assert f"## {title}\n" in text, title
    return " ".join(text.split(f"## {title}\n")[1].split("\n## ")[0].split())


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["test_nll"].isfinite()
    assert namespace["loss"].requires_grad


def test_readme_says_which_examples_need_which_data_files():
    from pyro_ffjord.datasets import caltech, freyfaces, mnist, omniglot

    data = section("Data for the examples")
    files = [f"{mnist.TRAIN_IMAGES}.gz", f"{mnist.TRAIN_LABELS}.gz", f"{mnist.TEST_IMAGES}.gz",
             f"{mnist.TEST_LABELS}.gz", *mnist.AMAT_FILES.values(), omniglot.FILENAME, freyfaces.FILENAME,
             caltech.SPLIT_FILE, caltech.UNSPLIT_FILE]
    for name in files:  # every file a loader reads, by the loader's own constant
        assert f"`{name}`" in data, name
    for url in (mnist.IDX_URL, mnist.AMAT_URL, caltech.PUBLISHED):
        assert url in data, url
    import vae_data
    for folder in vae_data.FOLDERS.values():  # the default folders under --data-dir's root
        assert f"`{folder}`" in data, folder
    assert "`--data-dir`" in data and "../shared/data/<folder>" in data
    for example in ("toy_density", "svi_guide", "amortized_vi", "neutra"):  # no download needed
        assert f"`{example}.py`" in data.split("need no download")[0], example


def test_readme_run_claims_match_the_scripts():
    import toy_density

    quick = section("Quick start")
    args = toy_density.parse_args([])
    assert args.threads == 1 and "on one CPU core" in quick and "one torch thread" in quick
    assert f"every {args.checkpoint_every} iterations and every {args.checkpoint_minutes:g} minutes" in quick
    assert f"`{toy_density.parse_args(['--quick']).out}{os.sep}`" in quick.replace("/", os.sep)
    examples = section("Examples and what they measured")
    assert "exit code 130" in examples and "refused" in examples and "`segments`" in examples
