"""Fused CPU kernels: LSQ fake quantization (``csrc/lsq_cpu.cpp``) and the attention-score MSE of the distillation
loss (``csrc/attention_mse_cpu.cpp``) for float32 tensors (:func:`cpu_kernels`), and the integer engine's fused passes
(``csrc/integer_cpu.cpp``: requantization, the attention block with its i-softmax, i-GELU, residual + integer
LayerNorm, and the Linears' weights packed for oneDNN's matmul primitive; :func:`integer_kernels`, a second
extension linked against the oneDNN of the PyPI wheel ``onednn-cpu-gomp``).

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
2 cores each) into the torch extensions folder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
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

__all__ = ["INTEGER_SOURCES", "SOURCES", "cpu_kernels", "integer_kernels", "lsq_kernel_applies"]

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("lsq_cpu.cpp", "attention_mse_cpu.cpp")]
INTEGER_SOURCES = [Path(__file__).with_name("csrc") / "integer_cpu.cpp"]
#: The PyPI wheel whose ``libdnnl.so.3`` (oneDNN 3.2, GNU OpenMP) the integer kernels link against.
ONEDNN_WHEEL = "onednn-cpu-gomp"
#: Compiler flags of both extensions. -fopenmp: ATen's parallel_for is OpenMP pragmas inlined from its headers;
#: without the flag they are ignored and every kernel runs on one thread (libgomp is torch's own, already loaded,
#: found by its soname; libdnnl finds the same one).
_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
_loaded: dict[str, Any] = {}


def cpu_kernels() -> Any | None:
    """The ``torch.ops.kdlsq`` namespace with the training kernels (``lsq_forward``, ``lsq_backward``,
    ``dropout_lsq_forward``, ``dropout_lsq_recompute``, ``dropout_lsq_backward``, ``attention_mse_forward``,
    ``attention_mse_backward``), building them on first call.

    Returns:
        ``torch.ops.kdlsq``, or None when the C++ build fails (no compiler, no ninja, non-Linux); the failure is
        logged once as a warning and not retried in this process.
    """
    if "ops" not in _loaded:
        _loaded["ops"] = _build("kdlsq_cpu_kernels", SOURCES, [])
    return _loaded["ops"]


def integer_kernels() -> Any | None:
    """The ``torch.ops.kdlsq`` namespace with the integer engine's kernels (``int_requant``, ``int_requant_split``,
    ``int_softmax_requant``, ``int_attention``, ``int_gelu_requant``, ``int_residual_layernorm``, ``int_embedding``,
    ``int_tanh``, ``set_simd``) and the class
    ``torch.classes.kdlsq.PackedS8`` (a Linear's int8 weights ``[in, out]`` packed once for oneDNN's matmul primitive;
    ``.mm(x8 [M, in] int8, out [M, out] int32 or None)`` returns ``x8 @ w`` exactly, ``.impl()`` oneDNN's kernel
    name, ``.nbytes()`` the packed bytes), building them on first call against ``libdnnl.so.3`` of the PyPI wheel
    ``onednn-cpu-gomp`` (pinned in ``requirements.txt``).

    Returns:
        ``torch.ops.kdlsq``, or None where the wheel is not installed or the build fails (logged once as a warning;
        the integer engine then runs its torch reference operators: the same integers, slower).
    """
    if "integer" not in _loaded:
        lib = _libdnnl()
        _loaded["integer"] = None if lib is None else _build(
            "kdlsq_integer_kernels", INTEGER_SOURCES, [f"-L{lib.parent}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib.parent}"])
    return _loaded["integer"]


def _libdnnl() -> Path | None:
    from importlib import metadata

    try:
        files = metadata.distribution(ONEDNN_WHEEL).files or []
        return next(Path(f.locate()).resolve() for f in files if f.name == "libdnnl.so.3")
    except (metadata.PackageNotFoundError, StopIteration):
        log.warning("integer kernels unavailable: no libdnnl.so.3 (pip install %s==2023.2.0); the integer engine uses its "
                    "torch operators (same integers, slower)", ONEDNN_WHEEL)
        return None


def _build(name: str, sources: list[Path], ldflags: list[str]) -> Any | None:
    try:
        if shutil.which("ninja") is None:  # the PyPI ``ninja`` wheel ships the binary outside PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        from torch.utils import cpp_extension

        cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=_CFLAGS,
                           extra_ldflags=["-fopenmp", *ldflags], is_python_module=False, verbose=False)
        return torch.ops.kdlsq
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch formula
        log.warning("fused CPU kernels %s unavailable (%s: %s); using the torch formula (same numbers, slower)", name,
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
