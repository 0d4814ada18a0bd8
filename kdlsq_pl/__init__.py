"""kdlsq-pl: KDLSQ quantization-aware distillation of BERT-family models with PyTorch Lightning.

Importing the package registers the OmegaConf resolvers that ``conf/`` uses (``bits``, ``cell``, ``fresh_dir``).
"""

import hashlib
import json
import os
from typing import Any, Mapping

from omegaconf import OmegaConf


def bits_name(weight_bits: int, embedding_bits: int, act_bits: int, overrides: Mapping[str, Any] | None = None,
              integer_ops: bool = False) -> str:
    """The field's short name of a bit setting: ``w2a8`` (embeddings at the weight width), ``w2e4a8``, ``fp32``.

    With per-module ``overrides`` (``quant.overrides``: pattern -> bits) the name gains ``_mp`` and six hex digits
    of the overrides' digest (``w2a8_mp3f0c1a``), so a mixed-precision cell never shares a folder with the
    uniform one; the presets in ``conf/quant`` give theirs a readable ``name`` instead. A student trained through
    I-BERT's integer operators (``quant.integer_ops``) ends in ``_ibert`` (``w8a8_ibert``).
    """
    w, e, a = int(weight_bits), int(embedding_bits), int(act_bits)
    base = "fp32" if min(w, e, a) >= 32 else (f"w{w}a{a}" if e == w else f"w{w}e{e}a{a}")
    if overrides:
        plain = OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else dict(overrides)
        digest = hashlib.sha1(json.dumps(list(plain.items())).encode()).hexdigest()[:6]  # in order: the last match wins
        base = f"{base}_mp{digest}"
    return f"{base}_ibert" if integer_ops else base


def cell_name(stage: str, method: str, task: str, quant: str, seed: int, teacher_seed: int | None = None) -> str:
    """Run-directory name of one grid cell: ``w2a8_mrpc_s42`` (KDLSQ), ``lsq_w2a8_mrpc_s42``, ``teacher_mrpc_s42``.
    A teacher's name carries ``teacher_seed`` (``teacher.seed``, the seed it trains with) when given, else ``seed``."""
    if stage == "teacher":
        return f"teacher_{task}_s{seed if teacher_seed is None else teacher_seed}"
    return f"{'' if method == 'kdlsq' else method + '_'}{quant}_{task}_s{seed}"


_CLAIMED: dict[str, str] = {}


def fresh_dir(base: str) -> str:
    """A run folder no other run holds: ``base`` itself, or ``base_2``, ``base_3`` ... when a run started in the same
    second under the same name already made it (two runs of one cell launched together would otherwise write into
    one folder and overwrite each other's config, log and checkpoints). The folder is created here by ``os.makedirs``,
    which fails when it exists, so two processes never claim the same one; within a process the same ``base`` gets
    the same answer (Hydra resolves its run folder more than once).

    Raises:
        OSError: the parent folder cannot be created (permissions, disk).
    """
    base = str(base)
    if base not in _CLAIMED:
        for n in range(1, 10_000):
            path = base if n == 1 else f"{base}_{n}"
            try:
                os.makedirs(path)
            except FileExistsError:
                continue
            _CLAIMED[base] = path
            break
        else:
            raise FileExistsError(f"{base}: 9999 folders of this name exist; allowed: a hydra.run.dir of your own")
    return _CLAIMED[base]


OmegaConf.register_new_resolver("bits", bits_name, replace=True)
OmegaConf.register_new_resolver("fresh_dir", fresh_dir, replace=True)
OmegaConf.register_new_resolver("cell", cell_name, replace=True)
OmegaConf.register_new_resolver("teacher_source", lambda cached: "cached" if cached else "live", replace=True)
# the minimal-knowledge study's cell suffix: a run without a hidden-state term is the "none" cell whatever its selection
OmegaConf.register_new_resolver("knowledge", lambda hidden, name: "none" if float(hidden) == 0 else name, replace=True)
