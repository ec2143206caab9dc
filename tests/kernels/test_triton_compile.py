"""The Triton kernels compile for NVIDIA GPUs (sm_80, sm_90) without one, and their PTX has the
properties the interpreter cannot show.

``triton.compile`` with an explicit target runs the whole pipeline (TTIR, TTGIR, LLVM, PTX and
``ptxas`` to a cubin) on the CPU. The interpreter runs the kernels' Python, not their compiled
code: type errors, unsupported constructs and the instructions chosen only show up here.

Checked on the PTX of every kernel under option combinations that cover every constexpr branch:

* no atomics (``atom.*``/``red.*``): reductions are deterministic;
* IEEE square roots and divisions only (no ``sqrt.approx``, ``div.approx``/``div.full``,
  ``rsqrt.approx``, ``rcp.approx``), as torch's CPU reference;
* fused multiply-adds only where torch rounds once too (``lerp``): kernels without a lerp have
  none (``enable_fp_fusion=False`` keeps ``x - x * c`` two roundings, as torch's separate ops).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from adafactor.kernels import HAS_TRITON

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
]

_INT64 = {"tiles", "sprogs", "meta", "fprogs", "chunks"}
_INT32 = {"skip_ptr"}
_FLOATS = {"sign", "clipv", "eps1", "eps1sq", "w1", "wd", "ema_m", "ema_1m", "clipnorm", "eps2"}
_FLOATS |= {"clip_d"}
_F64 = {"usum", "rmean_part", "wide_r", "wide_c"}  # float64 buffers


def _combos() -> list[dict[str, Any]]:
    import triton.language as tl

    from adafactor.kernels import adafactor_triton as k

    common = {"RB": k.REDUCE_BLOCK, "FB": k.FACTOR_BLOCK, "BLOCK": k.BLOCK_1D}
    common |= {"WR": k.WIDE_TILE[0], "WC": k.WIDE_TILE[1]}
    return [
        {  # float32, 'grad' momentum, clipnorm, clipvalue, weight decay 'lr', the default tile
            **common, "G_DT": tl.float32, "P_DT": tl.float32, "M_DT": tl.float32,
            "E_DT": tl.float32, "HAS_CLIPV": True, "WANT_X": True, "WANT_G": True, "TR": 16,
            "TC": 128, "CONTIG_C": True, "HAS_GSCALE": False, "CLIPNORM": True,
            "WANT_WIDE": True, "SCALE_PARAM": True, "ADD_EPS1": True, "MOM": 1,
            "CLAMP": False, "CLIP": True, "HAS_WD": True, "WD_MODE": 0, "SR": False, "EMA": False,
        },
        {  # bf16 weights, momentum and EMA, normalized_update, eps1 clamp, stochastic rounding,
            # global_clipnorm, 'lr_before', a strided column dim
            **common, "G_DT": tl.bfloat16, "P_DT": tl.bfloat16, "M_DT": tl.bfloat16,
            "E_DT": tl.bfloat16, "HAS_CLIPV": False, "WANT_X": True, "WANT_G": False, "TR": 128,
            "TC": 16, "CONTIG_C": False, "HAS_GSCALE": True, "CLIPNORM": False,
            "WANT_WIDE": True, "SCALE_PARAM": True, "ADD_EPS1": False, "MOM": 2,
            "CLAMP": True, "CLIP": True, "HAS_WD": True, "WD_MODE": 1, "SR": True, "EMA": True,
        },
        {  # float16 gradients, 'update' momentum, 'alpha' decay, a single column
            **common, "G_DT": tl.float16, "P_DT": tl.float32, "M_DT": tl.float32,
            "E_DT": tl.float32, "HAS_CLIPV": True, "WANT_X": False, "WANT_G": True,
            "TR": k.BLOCK_1D, "TC": 1, "CONTIG_C": True, "HAS_GSCALE": False, "CLIPNORM": False,
            "WANT_WIDE": False, "SCALE_PARAM": False, "ADD_EPS1": True, "MOM": 3,
            "CLAMP": False, "CLIP": False, "HAS_WD": True, "WD_MODE": 2, "SR": False, "EMA": True,
        },
        {  # no momentum, 'unscaled' decay, a single row
            **common, "G_DT": tl.float32, "P_DT": tl.float32, "M_DT": tl.float32,
            "E_DT": tl.float32, "HAS_CLIPV": False, "WANT_X": True, "WANT_G": False, "TR": 1,
            "TC": k.BLOCK_1D, "CONTIG_C": True, "HAS_GSCALE": False, "CLIPNORM": False,
            "WANT_WIDE": True, "SCALE_PARAM": True, "ADD_EPS1": True, "MOM": 0,
            "CLAMP": False, "CLIP": True, "HAS_WD": True, "WD_MODE": 3, "SR": False, "EMA": False,
        },
    ]  # fmt: skip


def _signature(fn: Any, consts: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _INT64:
            sig[name] = "*i64"
        elif name in _INT32:
            sig[name] = "*i32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name in _F64:
            sig[name] = "*fp64"
        else:
            sig[name] = "*fp32"
    return sig


_LERP_KERNELS = {"_factors", "_pass2_2d", "_pass2_1d", "_apply_2d", "_apply_1d"}
_APPROX = re.compile(r"\b(sqrt\.approx|div\.approx|div\.full|rsqrt\.approx|rcp\.approx)")
_ATOMIC = re.compile(r"\b(atom|red)\.")


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia_without_a_gpu(arch: int) -> None:
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces compilation")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adafactor.kernels import adafactor_triton as k

    target = GPUTarget("cuda", arch, 32)
    for combo in _combos():
        for fn in k.KERNELS:
            consts = {name: v for name, v in combo.items() if name in fn.arg_names}
            src = ASTSource(fn, _signature(fn, consts), consts)
            try:
                compiled = triton.compile(src, target=target, options={"enable_fp_fusion": False})
            except Exception as e:
                raise AssertionError(f"{fn.__name__} {consts}: {e}") from e
            ptx = compiled.asm["ptx"]
            assert "cubin" in compiled.asm, fn.__name__
            name = fn.__name__
            assert not _ATOMIC.search(ptx), f"{name}: atomics in the PTX"
            found = _APPROX.search(ptx)
            assert not found, f"{name}: {found.group(0)} (approximate) in the PTX"
            if "fma.rn.f32" in ptx:
                assert name in _LERP_KERNELS, f"{name}: a fused multiply-add without a lerp"
