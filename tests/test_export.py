"""Packed export: pack/unpack round trips, exact logits after reload, real size on disk."""

from __future__ import annotations

import pytest
import torch

from kdlsq_pl.callbacks.quantization import calibrate
from kdlsq_pl.export import export_packed, load_packed, pack_codes, unpack_codes
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.quant.modules import quantize_
from conftest import GLUE
from test_quant_insert import quant_cfg

GLUE_RTE_DEV = GLUE / "RTE" / "dev.tsv"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_pack_unpack_round_trip(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 1 << bits, (numel,), generator=g)
    packed = pack_codes(codes, bits)
    per = {2: 4, 4: 2}.get(bits, 1)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // per)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_pack_layout_by_hand():
    # 2 bits, little end first: codes 1,2,3,0 -> 1 + 2*4 + 3*16 + 0*64 = 57
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [57, 3]
    assert pack_codes(torch.tensor([15, 1]), 4).tolist() == [31]
    with pytest.raises(ValueError, match="codes must lie in \\[0, 4\\)"):
        pack_codes(torch.tensor([4]), 2)


def export_and_reload(tmp_path, minilm_path, cfg):
    """A MiniLM student quantized with ``cfg`` and calibrated on two real-looking pairs, exported to
    ``tmp_path/packed`` and reloaded: ``(student, export info, student logits, reloaded logits)``."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tok(["A man plays a guitar.", "Two dogs run through a snowy field."], ["Music.", "Animals."],
                     padding=True, return_tensors="pt"))
    torch.manual_seed(0)
    student = load_classifier(minilm_path, {"labels": ["0", "1"]}, ATTN_IMPLEMENTATION)
    quantize_(student, cfg)
    calibrate(student, [batch])
    student.eval()
    with torch.no_grad():
        before = student(**batch).logits
    info = export_packed(student, cfg, tmp_path / "packed")
    with torch.no_grad():
        after = load_packed(tmp_path / "packed")(**batch).logits
    return student, info, before, after


@pytest.mark.parametrize("quant", ["w2a8", "w4a8"])
def test_export_reload_exact_logits_and_size(tmp_path, minilm_path, quant):
    cfg = quant_cfg(quant)
    student, info, before, after = export_and_reload(tmp_path, minilm_path, cfg)
    assert torch.equal(before, after)
    fp32_file = tmp_path / "fp32"
    load_classifier(minilm_path, {"labels": ["0", "1"]}).save_pretrained(fp32_file)
    ratio = (fp32_file / "model.safetensors").stat().st_size / info["packed_bytes"]
    assert ratio >= (12 if quant == "w2a8" else 6.5)
    with pytest.raises(FileExistsError):
        export_packed(student, cfg, tmp_path / "packed")


def test_evaluate_dev_equals_a_hand_count_on_real_rte_dev(tmp_path, minilm_path):
    """``evaluate_dev`` (the stages' validation loop under Trainer.validate) on the first 32 real RTE dev rows: the
    accuracy equals a hand count of one-pair-at-a-time predictions, and the logit difference a hand maximum."""
    from conftest import GLUE, compose_cfg
    from kdlsq_pl.export import evaluate_dev
    from transformers import AutoTokenizer

    cfg = compose_cfg(tmp_path, "task=rte", "data.limit_eval_examples=32")
    torch.manual_seed(0)
    fp32 = load_classifier(minilm_path, cfg.task, ATTN_IMPLEMENTATION).eval()
    w8 = load_classifier(minilm_path, cfg.task, ATTN_IMPLEMENTATION)
    w8.load_state_dict(fp32.state_dict())
    quantize_(w8, quant_cfg("w8a8"))
    w8.eval()
    got = evaluate_dev({"fp32": fp32, "w8a8": w8}, cfg, minilm_path)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = [line.split("\t") for line in (GLUE / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:33]]
    assert len(rows) == 32
    right, diff = {"fp32": 0, "w8a8": 0}, 0.0
    with torch.no_grad():
        for _, a, b, label in rows:
            enc = tok(a, b, return_tensors="pt", truncation=True, max_length=128)
            z = {n: m(**enc).logits[0] for n, m in (("fp32", fp32), ("w8a8", w8))}
            for n in z:
                right[n] += int(z[n].argmax()) == ["entailment", "not_entailment"].index(label.strip())
            diff = max(diff, float((z["w8a8"] - z["fp32"]).abs().max()))
    assert got["fp32"]["acc"] == pytest.approx(100 * right["fp32"] / 32, abs=1e-4)
    assert got["w8a8"]["acc"] == pytest.approx(100 * right["w8a8"] / 32, abs=1e-4)
    assert got["fp32"]["max_abs_logit_diff"] == 0.0
    assert got["w8a8"]["max_abs_logit_diff"] == pytest.approx(diff, rel=1e-3, abs=1e-5) and diff > 0


def test_mixed_precision_export_reloads_exactly_and_its_file_is_the_sum_of_its_parts(tmp_path, minilm_path):
    import json
    import struct

    from safetensors import safe_open

    from test_quant_insert import MIXED, mixed_expected_bits
    _, info, before, after = export_and_reload(tmp_path, minilm_path, quant_cfg("w2a8") | {"overrides": MIXED})
    assert torch.equal(before, after)
    meta = json.loads((tmp_path / "packed" / "packed.json").read_text())
    expected = {name: b for name, b in mixed_expected_bits(6).items() if b < 32}
    assert {k.removesuffix(".weight"): v["bits"] for k, v in meta["packed"].items()} == expected
    # the file: 8-byte header length + JSON header + every tensor's bytes; the codes take ceil(numel / (8 // bits))
    # bytes at 2 and 4 bits and numel at 8; the rest are FP32 values (4 bytes) and the quantizers' bool flags (1 byte)
    path = tmp_path / "packed" / "model.packed.safetensors"
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    parts = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(".codes"):
                name = key.removesuffix(".weight.codes")
                numel = int(torch.tensor(meta["packed"][name + ".weight"]["shape"]).prod())
                per = {2: 4, 4: 2, 8: 1}[expected[name]]
                assert t.numel() == -(-numel // per)
                parts += -(-numel // per)
            else:
                assert t.dtype in (torch.float32, torch.bool), key
                parts += (4 if t.dtype == torch.float32 else 1) * t.numel()
    assert info["packed_bytes"] == path.stat().st_size == 8 + header_len + parts


def test_onnx_export_runs_in_onnxruntime_with_dynamic_axes(tmp_path, minilm_path):
    import onnx
    from transformers import AutoTokenizer

    from kdlsq_pl.export import export_onnx, onnx_session
    from kdlsq_pl.quant.modules import lsq_quantizers
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = [line.split("\t") for line in (GLUE_RTE_DEV).read_text(encoding="utf-8").splitlines()[1:13]]

    def enc(rs):
        return dict(tok([r[1] for r in rs], [r[2] for r in rs], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    torch.manual_seed(0)
    student = load_classifier(minilm_path, {"labels": ["0", "1"]}, ATTN_IMPLEMENTATION)
    cfg = quant_cfg("w2a8")
    cfg["weight"]["per_channel"] = True
    quantize_(student, cfg)
    calibrate(student, [enc(rows[:4])])
    student.eval()
    fp32 = load_classifier(minilm_path, {"labels": ["0", "1"]}).eval()  # the same weights, unquantized
    fp32.load_state_dict({k: v for k, v in student.state_dict().items() if k in fp32.state_dict()})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    path = export_onnx(student, tmp_path / "model.onnx", enc(rows[:4]))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the student itself is untouched
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    n_q = len(lsq_quantizers(student))
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == n_q  # one QDQ pair per quantizer
    session = onnx_session(path)
    for rs in (rows[4:6], rows[6:12]):  # other batch sizes and padded lengths than the export's example
        b = enc(rs)
        got = session.run(None, {k: b[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
        with torch.no_grad():
            want, full = student(**b).logits.numpy(), fp32(**b).logits.numpy()
        assert got.shape == want.shape
        # ONNX Runtime runs the quantized student, not the FP32 model: the same QDQ arithmetic but for ties (torch
        # multiplies by 1/s), the -128 code and ORT's integer kernels, a few code flips
        assert abs(got - want).max() < 0.25 * abs(full - want).max()
