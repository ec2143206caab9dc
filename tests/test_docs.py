"""The examples in docstrings and in the README run and say what they claim."""

import doctest
import pathlib
import re

import pytest

import adafactor
import adafactor.factoring
import adafactor.optimizer

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", [adafactor, adafactor.factoring, adafactor.optimizer])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its quick start"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    opt = namespace["opt"]
    assert opt.state[namespace["model"][0].weight]["step"].item() == 1
