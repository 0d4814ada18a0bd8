"""The classifier head's pooling: the [CLS] token (BERT's head) or the mean over real tokens.

all-MiniLM-L6-v2 was trained for sentence embeddings with mean pooling over real tokens, so its [CLS]
vector is not the trained path (issue 15). ``pooling=mean`` replaces the BERT pooler's input (the
[CLS] hidden state) by ``sum_t m_t h_t / sum_t m_t`` over the last layer's hidden states ``h`` with the
attention mask ``m``; the pooler's dense + tanh stay (``pooler_dense=true``) or are dropped. The choice
is written into the model config (``classifier_pooling``, ``classifier_pooler_dense``, the names of
ModernBERT's option), so a stored teacher and every student loaded from it pool the same way, and
the dense layer keeps its name ``<base>.pooler.dense`` (the quantizers, the packed export and the
checkpoints see the same module paths as with BERT's pooler).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlsq_pl.config import POOLINGS
from kdlsq_pl.errors import ConfigError


class Pooler(nn.Module):
    """Pool ``[B, T, D]`` hidden states to ``[B, D]``: [CLS] (position 0) or the mean over real tokens,
    then optionally ``tanh(dense(.))`` (BERT's pooler).

    The attention mask ``[B, T]`` (1 = real token) is set by a forward pre-hook on the encoder before
    each forward (``apply_pooling``); with none set every position counts.

    Args:
        mode: ``cls`` or ``mean``.
        dense, activation: the checkpoint's pooler layers, or ``None`` for no projection.
    """

    def __init__(self, mode: str, dense: nn.Module | None, activation: nn.Module | None):
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling={mode!r}; allowed: {', '.join(POOLINGS)}")
        self.mode = mode
        self.dense = dense
        self.activation = activation
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            pooled = hidden_states[:, 0]
        elif self.attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            m = self.attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # [B, T, 1]
            pooled = (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        if self.dense is not None:
            pooled = self.activation(self.dense(pooled))
        return pooled

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def _stash_attention_mask(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the encoder: hand this call's attention mask to its pooler (a top-level
    function, so the model still pickles for DDP)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    encoder.pooler.attention_mask = mask


def apply_pooling(model: nn.Module, pooling: str | None = None, pooler_dense: bool | None = None) -> nn.Module:
    """Set the head's pooling of a Hugging Face sequence classifier, in place, and record it in ``model.config``.

    Args:
        model: a BERT-layout classifier whose encoder (``model.base_model``) has a ``pooler`` with
            ``dense`` and ``activation`` (BERT, MiniLM).
        pooling: ``cls`` | ``mean``; ``None`` reads ``model.config.classifier_pooling`` (default ``cls``).
        pooler_dense: keep the pooler's dense + tanh; ``None`` reads ``model.config.classifier_pooler_dense``
            (default true).

    Returns:
        ``model``. With ``cls`` and the dense layer (BERT's own head) nothing is replaced.

    Raises:
        ConfigError: an unknown pooling, or a non-default pooling on an encoder with no BERT pooler.
    """
    cfg = model.config
    pooling = pooling if pooling is not None else getattr(cfg, "classifier_pooling", "cls")
    pooler_dense = pooler_dense if pooler_dense is not None else getattr(cfg, "classifier_pooler_dense", True)
    if pooling not in POOLINGS:
        raise ConfigError(f"task.teacher.pooling={pooling!r} is not allowed; allowed: {', '.join(POOLINGS)}")
    cfg.classifier_pooling, cfg.classifier_pooler_dense = pooling, bool(pooler_dense)
    if pooling == "cls" and pooler_dense:
        return model
    encoder = model.base_model
    old = getattr(encoder, "pooler", None)
    if old is None or not hasattr(old, "dense"):
        raise ConfigError(f"task.teacher.pooling={pooling} pooler_dense={pooler_dense}: model type {cfg.model_type} has no "
                          f"BERT pooler to replace; allowed there: pooling=cls with pooler_dense=true")
    if isinstance(old, Pooler):
        raise ValueError("the pooling is already applied")
    encoder.pooler = Pooler(pooling, old.dense if pooler_dense else None, old.activation if pooler_dense else None)
    encoder.register_forward_pre_hook(_stash_attention_mask, with_kwargs=True)
    return model

