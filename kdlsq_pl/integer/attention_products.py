"""The integer engine's two attention products, int8 x int8 -> int32, by ONNX Runtime's ``MatMulInteger``.

oneDNN's int8 GEMM reaches PyTorch only as the 2-D ``torch._int_mm``; the attention products are batched over
(example, head) with tiny matrices (``[T, d] x [d, T]`` with d = 32 for MiniLM), where a loop of ``_int_mm`` pays
one call per (example, head) and ``torch.matmul`` on int32 has no BLAS kernel (it is the engine's slowest step).
ONNX Runtime's ``MatMulInteger`` (MLAS) runs the whole ``[B, H, T, d] x [B, H, d, T]`` product in one call, fastest
with an unsigned 8-bit left operand: the query codes enter as ``q + 128`` (a bit flip of the int8 codes) with
``a_zero_point = 128``, so the product is exactly ``q k^T``; the probability codes are non-negative already. The
head split and merge are ``Transpose`` nodes of the same two graphs.

Every result is an exact integer product (int32 accumulation, no float). :func:`products` checks that once per
process on extreme codes against ``torch.matmul`` in int64, because MLAS's unsigned x signed kernel for CPUs
without VNNI (``vpmaddubsw``) saturates pairs of products at 16 bits; where the check fails or onnxruntime is
missing it returns None and the engine keeps ``torch.matmul``.

Source: the ``MatMulInteger`` operator of the ONNX specification (opset 10); onnxruntime's MLAS QGEMM.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["AttentionProducts", "products"]


def _graphs() -> tuple[bytes, bytes]:
    from onnx import TensorProto, helper

    def model(nodes, inputs, output, inits=()):
        g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.INT32, None)], list(inits))
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m.SerializeToString()

    dims = ["B", "T", "H", "d"]
    q = helper.make_tensor_value_info("q", TensorProto.UINT8, dims)  # query codes + 128
    k = helper.make_tensor_value_info("k", TensorProto.INT8, dims)
    zp = helper.make_tensor("zp", TensorProto.UINT8, [], [128])
    scores = model([helper.make_node("Transpose", ["q"], ["qh"], perm=[0, 2, 1, 3]),   # [B, H, T, d]
                    helper.make_node("Transpose", ["k"], ["kh"], perm=[0, 2, 3, 1]),   # [B, H, d, T]
                    helper.make_node("MatMulInteger", ["qh", "kh", "zp"], ["scores"])],  # [B, H, T, T]
                   [q, k], "scores", [zp])
    p = helper.make_tensor_value_info("p", TensorProto.UINT8, ["B", "H", "T", "T"])
    v = helper.make_tensor_value_info("v", TensorProto.INT8, dims)
    context = model([helper.make_node("Transpose", ["v"], ["vh"], perm=[0, 2, 1, 3]),
                     helper.make_node("MatMulInteger", ["p", "vh"], ["ctx_h"]),           # [B, H, T, d]
                     helper.make_node("Transpose", ["ctx_h"], ["ctx"], perm=[0, 2, 1, 3])],  # [B, T, H, d]
                    [p, v], "ctx")
    return scores, context


class AttentionProducts:
    """``scores = q k^T`` and ``context = p v`` on int8 codes, by two ONNX Runtime sessions.

    Args:
        threads: intra-op threads of both sessions (the engine passes ``torch.get_num_threads()``).
    """

    def __init__(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no busy-waiting after a run: the torch ops between the products need these cores (spinning ORT threads
        # made the whole engine 1.5x slower here)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s, c = _graphs()
        self._scores = ort.InferenceSession(s, opts, providers=["CPUExecutionProvider"])
        self._context = ort.InferenceSession(c, opts, providers=["CPUExecutionProvider"])

    def scores(self, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``q``, ``k``: int8 codes ``[B, T, H, d]`` -> int32 ``[B, H, T, T]`` (contiguous), ``q_h k_h^T`` per head;
        written into ``out`` when given (contiguous int32 of that shape)."""
        B, T, H, _ = q.shape
        qu = q.contiguous().view(torch.uint8) ^ 128  # q + 128 as uint8 (two's complement: flip the sign bit)
        return self._run(self._scores, {"q": qu, "k": k.contiguous()}, "scores", (B, H, T, T), out)

    def context(self, p: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``p``: probability codes ``[B, H, T, T]`` (int8 or uint8, all >= 0); ``v``: int8 ``[B, T, H, d]`` ->
        int32 ``[B, T, H, d]``, ``p_h v_h`` per head with the heads back in place; written into ``out`` when given."""
        return self._run(self._context, {"p": p.contiguous().view(torch.uint8), "v": v.contiguous()}, "ctx", tuple(v.shape), out)

    @staticmethod
    def _run(session, inputs: dict, name: str, shape: tuple, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.from_numpy(session.run(None, {k: t.numpy() for k, t in inputs.items()})[0])
        if tuple(out.shape) != shape or out.dtype != torch.int32 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"attention products: out must be a contiguous int32 CPU tensor of shape {shape}; got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        io = session.io_binding()  # ONNX Runtime writes straight into the caller's buffer (no new output each call)
        for k, t in inputs.items():
            io.bind_cpu_input(k, t.numpy())
        io.bind_output(name, "cpu", 0, np.int32, list(shape), out.data_ptr())
        session.run_with_iobinding(io)
        return out


_cache: dict[int, Any] = {}


def products(threads: int | None = None) -> AttentionProducts | None:
    """An exact :class:`AttentionProducts` for ``threads`` (default: torch's), or None where onnxruntime is missing or
    its kernels are not exact here (checked once per thread count on saturating codes; see the module docstring)."""
    threads = torch.get_num_threads() if threads is None else threads
    if threads not in _cache:
        _cache[threads] = _checked(threads)
    return _cache[threads]


def _checked(threads: int) -> AttentionProducts | None:
    try:
        ap = AttentionProducts(threads)
    except Exception as e:  # noqa: BLE001 - no onnxruntime (or no onnx): the engine keeps torch.matmul
        log.warning("integer engine: ONNX Runtime attention products unavailable (%s: %s); using torch.matmul", type(e).__name__, e)
        return None
    g = torch.Generator().manual_seed(0)
    B, T, H, d = 2, 24, 2, 32
    # extreme codes first (where a 16-bit pairwise sum would saturate), then random ones
    q = torch.cat([torch.full((1, T, H, d), 127, dtype=torch.int8), torch.randint(-128, 128, (1, T, H, d), generator=g, dtype=torch.int8)])
    k = torch.cat([torch.full((1, T, H, d), 127, dtype=torch.int8), torch.randint(-128, 128, (1, T, H, d), generator=g, dtype=torch.int8)])
    k[0, :, :, ::2] = -128
    p = torch.cat([torch.full((1, H, T, T), 127, dtype=torch.int8), torch.randint(0, 128, (1, H, T, T), generator=g, dtype=torch.int8)])
    want_s = torch.matmul(q.transpose(1, 2).long(), k.permute(0, 2, 3, 1).long())
    want_c = torch.matmul(p.long(), k.transpose(1, 2).long()).transpose(1, 2)
    if torch.equal(ap.scores(q, k).long(), want_s) and torch.equal(ap.context(p, k).long(), want_c):
        return ap
    log.warning("integer engine: ONNX Runtime's MatMulInteger is not exact on this CPU (no VNNI?); using torch.matmul")
    return None
