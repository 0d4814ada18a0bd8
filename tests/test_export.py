"""Packed export: pack/unpack round trips, exact logits after reload, real size on disk."""

from __future__ import annotations

import pytest
import torch

from kdlsq_pl.callbacks.quantization import calibrate
from kdlsq_pl.export import export_packed, load_packed, pack_codes, unpack_codes
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.quant.modules import quantize_bert
from test_quant_insert import quant_cfg


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


@pytest.mark.parametrize("quant", ["w2a8", "w4a8"])
def test_export_reload_exact_logits_and_size(tmp_path, minilm_path, quant):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tok(["A man plays a guitar.", "Two dogs run through a snowy field."], ["Music.", "Animals."],
                     padding=True, return_tensors="pt"))
    torch.manual_seed(0)
    student = load_classifier(minilm_path, {"labels": ["0", "1"]}, ATTN_IMPLEMENTATION)
    cfg = quant_cfg(quant)
    quantize_bert(student, cfg)
    calibrate(student, [batch])
    student.eval()
    with torch.no_grad():
        before = student(**batch).logits
    info = export_packed(student, cfg, tmp_path / "packed")
    reloaded = load_packed(tmp_path / "packed")
    with torch.no_grad():
        after = reloaded(**batch).logits
    assert torch.equal(before, after)
    fp32_file = tmp_path / "fp32"
    load_classifier(minilm_path, {"labels": ["0", "1"]}).save_pretrained(fp32_file)
    ratio = (fp32_file / "model.safetensors").stat().st_size / info["packed_bytes"]
    assert ratio >= (12 if quant == "w2a8" else 6.5)
    with pytest.raises(FileExistsError):
        export_packed(student, cfg, tmp_path / "packed")
