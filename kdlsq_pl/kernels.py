"""Fused CPU kernels: LSQ fake quantization (``csrc/lsq_cpu.cpp``) and the attention-score MSE of the distillation
loss (``csrc/attention_mse_cpu.cpp``) for float32 tensors, and the integer engine's fused passes
(``csrc/integer_cpu.cpp``: requantization, the attention block with its i-softmax, i-GELU, residual + integer
LayerNorm).

The unfused torch formula of :mod:`kdlsq_pl.quant.lsq` makes about four passes over a tensor forward and ten
backward (div, round, clamp, mul; compares, where, round, sub, two masked fills, two muls); on CPU those
elementwise passes cost about as much as all the matmuls of a step. The C++ kernel does one pass each way with
the same arithmetic in the same order, so forward output and both gradients are bit-identical (tests compare with
``torch.equal``); the sum of ``d/ds`` over the elements stays in torch (``sum_to_size``), so its order is torch's.
The attention-score MSE likewise replaces about fifteen passes per layer (two thresholds, difference, square,
pair mask, and their backward) by one each way, the sum again left to torch, and keeps one tensor for the backward
instead of both score tensors. The attention probabilities' dropout and quantizer run as one pass each way
(``dropout_lsq_*``) that keeps a one-byte dropout mask instead of dropout's float noise and the dropped tensor.

The kernels are compiled on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; about 15 s on
2 cores) into the torch extensions folder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
and reused afterwards. It carries AVX-512 (x86-64-v4), AVX2 and baseline x86-64 copies chosen at load time, so one build serves
any CPU sharing the folder. Where they cannot be built, :func:`cpu_kernels` logs one warning and returns None, and
quantization and the loss fall back to the torch formulas (same numbers, slower). GPU tensors always take the torch formula.

Source: Esser et al. 2020, "Learned Step Size Quantization", Eq. (1)-(3).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["SOURCES", "cpu_kernels", "lsq_kernel_applies"]

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("lsq_cpu.cpp", "attention_mse_cpu.cpp", "integer_cpu.cpp")]
_loaded: dict[str, Any] = {}


def cpu_kernels() -> Any | None:
    """The ``torch.ops.kdlsq`` namespace (``lsq_forward``, ``lsq_backward``, ``dropout_lsq_forward``,
    ``dropout_lsq_recompute``, ``dropout_lsq_backward``, ``attention_mse_forward``, ``attention_mse_backward``,
    ``int_requant``, ``int_softmax_requant``, ``int_attention``, ``int_gelu_requant``, ``int_residual_layernorm``,
    ``set_simd``), building it on first call.

    Returns:
        ``torch.ops.kdlsq``, or None when the C++ build fails (no compiler, no ninja, non-Linux); the failure is
        logged once as a warning and not retried in this process.
    """
    if "ops" not in _loaded:
        _loaded["ops"] = _build()
    return _loaded["ops"]


def _build() -> Any | None:
    try:
        if shutil.which("ninja") is None:  # the PyPI ``ninja`` wheel ships the binary outside PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        from torch.utils import cpp_extension

        # -fopenmp: ATen's parallel_for is OpenMP pragmas inlined from its headers; without the flag they are ignored
        # and every kernel runs on one thread (libgomp is torch's own, already loaded, found by its soname)
        cpp_extension.load(name="kdlsq_cpu_kernels", sources=[str(s) for s in SOURCES],
                           extra_cflags=["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        return torch.ops.kdlsq
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch formula
        log.warning("fused CPU kernels unavailable (%s: %s); using the torch formula (same numbers, slower)",
                    type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
        return None


def lsq_kernel_applies(v: Tensor, s: Tensor) -> bool:
    """Whether the fused LSQ kernel handles ``v`` quantized with step ``s`` (already broadcast-shaped).

    True for float32 CPU tensors with one step size (any layout) or one per row of a 2-D ``v``
    (``s`` of shape ``[rows, 1]``, a per-channel weight along dim 0).
    """
    if v.device.type != "cpu" or v.dtype != torch.float32 or s.dtype != torch.float32:
        return False
    return s.numel() == 1 or (v.dim() == 2 and tuple(s.shape) == (v.shape[0], 1))


#: glibc ``mallopt`` parameters (malloc.h): ``M_TRIM_THRESHOLD`` and ``M_MMAP_THRESHOLD``.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest ``M_MMAP_THRESHOLD`` glibc accepts on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``), bytes.
MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_memory(trim_threshold: int = 2**30) -> bool:
    """Make glibc malloc keep freed blocks for reuse instead of handing them back to the OS.

    A training step allocates and frees the same large activations (a ``[32, 12, 128, 128]`` float32 attention
    tensor is 25 MB) every step. By default glibc serves blocks of that size with fresh ``mmap`` calls (or trims
    the heap after freeing them), so every step page-faults them in again: about 1.8 us per 4 KB page here, e.g.
    19 ms instead of 4.5 ms for one fused kernel pass over such a tensor. This sets ``M_MMAP_THRESHOLD`` to
    32 MB (the most glibc allows) and ``M_TRIM_THRESHOLD`` to ``trim_threshold`` bytes, so such blocks come from
    and return to the heap. The process's resident memory then stays near its peak. Numbers are unaffected.

    Returns:
        True when both settings took effect; False off glibc (macOS, musl), where nothing changes.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
