"""docs/integrations.md: every Python recipe parses; those that need only torch run."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from adafactor import Adafactor

pytestmark = pytest.mark.integration

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def _blocks() -> dict[str, str]:
    """Python blocks by the section they sit in."""
    out: dict[str, str] = {}
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", section, flags=re.S)):
            out[f"{title} #{i}"] = block
    return out


def test_every_recipe_parses():
    blocks = _blocks()
    assert {k.split(" #")[0] for k in blocks} >= {
        "transformers `Trainer`",
        "Lightning",
        "accelerate",
        "torch.distributed.checkpoint",
        "torch LR schedulers",
        "timm",
    }
    for name, block in blocks.items():
        compile(block, f"{DOC}: {name}", "exec")


@pytest.mark.parametrize("section", ["torch.distributed.checkpoint #0", "torch LR schedulers #0"])
def test_torch_only_recipes_run(section):
    model = torch.nn.Linear(4, 2)
    opt = Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False)
    exec(
        _blocks()[section],
        {"torch": torch, "Adafactor": Adafactor, "model": model, "opt": opt, "n": 4},
    )
