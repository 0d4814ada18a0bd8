"""kdlsq-pl: KDLSQ quantization-aware distillation of BERT-family models with PyTorch Lightning.

Importing the package registers the OmegaConf resolvers that ``conf/`` uses (``bits``, ``cell``).
"""

from omegaconf import OmegaConf


def bits_name(weight_bits: int, embedding_bits: int, act_bits: int) -> str:
    """The field's short name of a bit setting: ``w2a8`` (embeddings at the weight width), ``w2e4a8``, ``fp32``."""
    w, e, a = int(weight_bits), int(embedding_bits), int(act_bits)
    if min(w, e, a) >= 32:
        return "fp32"
    return f"w{w}a{a}" if e == w else f"w{w}e{e}a{a}"


def cell_name(stage: str, method: str, task: str, quant: str, seed: int) -> str:
    """Run-directory name of one grid cell: ``w2a8_mrpc_s42`` (KDLSQ), ``lsq_w2a8_mrpc_s42``, ``teacher_mrpc_s42``."""
    if stage == "teacher":
        return f"teacher_{task}_s{seed}"
    return f"{'' if method == 'kdlsq' else method + '_'}{quant}_{task}_s{seed}"


OmegaConf.register_new_resolver("bits", bits_name, replace=True)
OmegaConf.register_new_resolver("cell", cell_name, replace=True)
