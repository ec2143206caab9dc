"""Presets "paper" and "t5" against float64 transcriptions of their published definitions.

No reference library runs here for these two, so ``tests/reference_numpy.py`` transcribes the
paper's Algorithms 4/5 (as Tensor2Tensor runs them) and Mesh TensorFlow's Adafactor (as T5 used
it). The inputs are those of the golden files (``tests/golden``). Same criterion as the golden
tests: at every step, each parameter within ``RTOL`` of its largest movement over the 20 steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from adafactor import PRESETS, Adafactor

from .reference_numpy import MeshTFAdafactor, PaperAdafactor, mesh_tf_factored_dims
from .test_parity_golden import CASES, RTOL, Golden, load_golden

INPUTS = {
    "mixed": "tf_keras__defaults__mixed__s0",
    "large": "tf_keras__defaults__large__s0",
    "conv": "generated/torch__defaults__conv__s0",
}
# rank-3 (12, 6, 6): dims 1 and 2 tie for the second largest size; Mesh TF takes the earlier one.
TIE_PARAM = "t12x6x6"

Transcription = Callable[[tuple[int, ...]], Any]  # shape -> object with .step(x, g) -> x


@dataclass(frozen=True)
class TranscriptionCase:
    name: str
    config: str
    ours: dict[str, Any]
    ref: Transcription


def _paper(beta1: float | None = None) -> Transcription:
    return lambda shape: PaperAdafactor(shape, beta1=beta1)


def _mesh_tf(min_dim: int = 128) -> Transcription:
    return lambda shape: MeshTFAdafactor(shape, min_dim_size_to_factor=min_dim)


TRANSCRIPTION_CASES: list[TranscriptionCase] = [
    TranscriptionCase("paper", "mixed", {"preset": "paper"}, _paper()),
    TranscriptionCase("paper", "large", {"preset": "paper"}, _paper()),
    TranscriptionCase("paper", "conv", {"preset": "paper"}, _paper()),
    TranscriptionCase("paper_beta1", "mixed", {"preset": "paper", "beta1": 0.9}, _paper(0.9)),
    TranscriptionCase("paper_beta1", "large", {"preset": "paper", "beta1": 0.9}, _paper(0.9)),
    # min dim 128: nothing in `mixed` and not 64x128 is factored (full second moments).
    TranscriptionCase("t5", "mixed", {"preset": "t5"}, _mesh_tf()),
    TranscriptionCase("t5", "large", {"preset": "t5"}, _mesh_tf()),
    # Small min dim: matrices and the 3-D/4-D tensors are factored over their two largest dims.
    TranscriptionCase(
        "t5_mindim1", "mixed", {"preset": "t5", "min_dim_size_to_factor": 1}, _mesh_tf(1)
    ),
    TranscriptionCase(
        "t5_mindim1", "large", {"preset": "t5", "min_dim_size_to_factor": 1}, _mesh_tf(1)
    ),
    TranscriptionCase(
        "t5_mindim4",
        "conv",
        {"preset": "t5", "min_dim_size_to_factor": 4},
        _mesh_tf(4),
    ),
]


def transcription_errors(
    g: Golden, ours: dict[str, Any], make_ref: Transcription, names: list[str]
) -> dict[str, float]:
    """Run ``Adafactor(**ours)`` in fp32 and the float64 transcription on the same inputs; return
    each param's worst error over all steps, relative to the transcription's largest movement."""
    params = [torch.nn.Parameter(torch.tensor(g.init[n])) for n in names]
    opt = Adafactor(params, **ours)
    refs = {n: make_ref(tuple(g.init[n].shape)) for n in names}
    x_ref = {n: g.init[n].astype(np.float64) for n in names}
    ours_traj: dict[str, list[np.ndarray]] = {n: [] for n in names}
    ref_traj: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for t in range(g.steps):
        for p, n in zip(params, names):
            p.grad = torch.tensor(g.grads[n][t])
            x_ref[n] = refs[n].step(x_ref[n], g.grads[n][t].astype(np.float64))
            ref_traj[n].append(x_ref[n])
        opt.step()
        for p, n in zip(params, names):
            ours_traj[n].append(p.detach().numpy().astype(np.float64))
    errors = {}
    for n in names:
        ref, mine = np.stack(ref_traj[n]), np.stack(ours_traj[n])
        movement = np.abs(ref - g.init[n]).max()
        assert movement > 0, n
        errors[n] = float(np.abs(mine - ref).max() / movement)
    return errors


@pytest.mark.parametrize(
    "case", TRANSCRIPTION_CASES, ids=[f"{c.name}-{c.config}" for c in TRANSCRIPTION_CASES]
)
def test_preset_matches_transcription(case: TranscriptionCase) -> None:
    g = load_golden(INPUTS[case.config])
    names = list(g.names)
    errors = transcription_errors(g, case.ours, case.ref, names)
    bad = {n: e for n, e in errors.items() if not e <= RTOL}
    assert not bad, f"relative error above {RTOL}: {bad}"


def test_t5_transcription_factors_what_it_should() -> None:
    """The t5 cases exercise largest-two factoring of 3-D/4-D tensors (not a vacuous pass)."""
    assert mesh_tf_factored_dims((16, 4, 8), 1) == (0, 2)
    assert mesh_tf_factored_dims((4, 3, 5, 7), 4) == (3, 2)
    assert mesh_tf_factored_dims((32, 16, 3, 3), 4) == (0, 1)
    assert mesh_tf_factored_dims((64, 128), 128) is None
    assert mesh_tf_factored_dims((12, 6, 6), 4) == (0, 1)  # tie: the earlier dim


def test_t5_largest2_tie_goes_to_the_earlier_dim() -> None:
    g = load_golden(INPUTS["conv"])
    errors = transcription_errors(
        g, {"preset": "t5", "min_dim_size_to_factor": 4}, _mesh_tf(4), [TIE_PARAM]
    )
    assert errors[TIE_PARAM] <= RTOL, errors


def test_every_preset_has_a_parity_case() -> None:
    golden = {c.ours["preset"] for c in CASES if c.ours and not c.refused and not c.skip}
    transcribed = {c.ours["preset"] for c in TRANSCRIPTION_CASES}
    assert golden | transcribed == set(PRESETS)
    assert {"paper", "t5"} <= transcribed
