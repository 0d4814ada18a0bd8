"""Minimal hidden-state knowledge: which part of the teacher's hidden states a student distils (depth, length,
width), as masks over the teacher's ``[B, T, D]`` hidden states.

Source: Liu, Meng, Lin, Wang, Zhou, "Marginal Utility Diminishes: Exploring the Minimum Knowledge for BERT
Knowledge Distillation" (ACL 2021, arXiv 2106.05691; code ``llyx97/Marginal-Utility-Diminishes``;
METHODS.md section 4). Three axes:

* **depth** (:func:`depth_map`): student hidden state ``i`` (0 = embeddings .. ``L_s``) is matched to teacher hidden
  state ``round(i * top / L_s)``, ``top`` the teacher layer the student's top maps to (``L_t``, or a layer below the
  top, reported more stable), and only the top ``n`` student hidden states are distilled;
* **length** (:func:`token_ranking`): per example the ``k`` tokens with the highest teacher [CLS] attention,
  averaged over heads, or the first ``k`` tokens (the baseline), [SEP] excluded or not;
* **width** (:func:`width_mask`): per kept token the ``ceil(fraction * D)`` dimensions of the largest teacher
  magnitude, or a random fixed set of dimensions per layer (the baseline).

The student side is masked the same way: the hidden-state MSE runs over the kept (token, dimension) entries only
(:func:`kdlsq_pl.distill.losses.hidden_state_mse` with per-layer masks). The released code zeroes only the teacher
tensor, which also pulls every other student entry towards 0: a penalty on the knowledge *not* kept, so it is not
followed here. The masks are computed from the teacher alone, so a cache can store exactly the kept entries
(:mod:`kdlsq_pl.distill.teacher_cache`) and the student trains without the teacher, with the same loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from kdlsq_pl.errors import ConfigError
from kdlsq_pl.options import TokenRule, WidthRule, allowed


@dataclass(frozen=True)
class HiddenSelection:
    """One point of the study: what of the teacher's hidden states is distilled.

    Attributes:
        top_layers: distil only the top ``n`` student hidden states (``None``: all ``L_s + 1``).
        map_top: the teacher hidden state the student's top one maps to (``None``: the teacher's top, ``L_t``).
        tokens: ``k`` tokens kept per example and layer (``None``: every real token).
        token_rule: ``first`` (the first ``k`` real tokens) or ``cls_attention`` (the ``k`` with the highest
            teacher [CLS] attention, averaged over heads).
        keep_sep: whether [SEP] tokens may be kept (``cls_attention`` only; the paper found excluding them better).
        width: fraction of each kept hidden vector's dimensions kept (``None``: all ``D``).
        width_rule: ``magnitude`` (the largest ``|h_T|``) or ``random`` (a fixed random set per layer, ``seed``).
        seed: the random width baseline's seed.
    """

    top_layers: int | None = None
    map_top: int | None = None
    tokens: int | None = None
    token_rule: str = "first"
    keep_sep: bool = False
    width: float | None = None
    width_rule: str = "magnitude"
    seed: int = 0

    def __post_init__(self):
        if self.token_rule not in allowed(TokenRule):
            raise ConfigError(f"loss.selection.token_rule={self.token_rule!r} is not allowed; allowed: {', '.join(allowed(TokenRule))}")
        if self.width_rule not in allowed(WidthRule):
            raise ConfigError(f"loss.selection.width_rule={self.width_rule!r} is not allowed; allowed: {', '.join(allowed(WidthRule))}")
        if self.width is not None and not 0.0 < float(self.width) <= 1.0:
            raise ConfigError(f"loss.selection.width={self.width!r} is out of range; allowed: 0 < width <= 1 or null (all)")
        for name in ("top_layers", "tokens"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"loss.selection.{name}={v!r} is out of range; allowed: >= 1 or null (all)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "HiddenSelection":
        """From ``loss.selection`` (``None``: the full knowledge)."""
        return cls(**{k: v for k, v in dict(cfg or {}).items() if k in cls.__dataclass_fields__})

    @property
    def is_full(self) -> bool:
        """Whether every hidden state, token and dimension is distilled (the plain KDLSQ term)."""
        return self.top_layers is None and self.map_top is None and self.tokens is None and self.width is None

    @property
    def needs_attention(self) -> bool:
        """Whether the ranking needs the teacher's attention (``cls_attention`` with a token budget)."""
        return self.tokens is not None and self.token_rule == "cls_attention"

    def fraction(self, n_student: int, n_teacher: int, lengths: Sequence[int], hidden_size: int) -> float:
        """The share of the full hidden-state knowledge kept (entries of the distilled teacher states over every
        entry of all ``L_s + 1`` matched states), on examples of ``lengths`` real tokens."""
        n_layers = sum(t is not None for t in depth_map(n_student, n_teacher, self.map_top, self.top_layers))
        full = (n_student + 1) * sum(lengths) * hidden_size
        kept_tokens = sum(min(n, self.tokens) if self.tokens else n for n in lengths)
        width = math.ceil(self.width * hidden_size) if self.width else hidden_size
        return n_layers * kept_tokens * width / full


def depth_map(n_student: int, n_teacher: int, map_top: int | None = None, top_layers: int | None = None) -> list[int | None]:
    """Teacher hidden-state index for each student hidden state ``0..L_s`` (``None``: not distilled).

    ``round(i * top / L_s)`` with ``top = map_top`` (default ``L_t``); equal depths and ``map_top=None`` give the
    identity (:func:`kdlsq_pl.distill.losses.layer_map`'s hidden map when ``L_t`` is a multiple of ``L_s``).
    With ``top_layers = n`` only ``i > L_s - n`` are kept.

    Raises:
        ConfigError: ``map_top`` outside ``1..L_t`` or ``top_layers`` outside ``1..L_s + 1``.
    """
    top = n_teacher if map_top is None else int(map_top)
    if not 1 <= top <= n_teacher:
        raise ConfigError(f"loss.selection.map_top={map_top!r} is out of range; allowed: 1..{n_teacher} or null (the top)")
    if top_layers is not None and not 1 <= int(top_layers) <= n_student + 1:
        raise ConfigError(f"loss.selection.top_layers={top_layers!r} is out of range; allowed: 1..{n_student + 1} or null (all)")
    first = 0 if top_layers is None else n_student + 1 - int(top_layers)
    return [int(math.floor(i * top / n_student + 0.5)) if i >= first else None for i in range(n_student + 1)]


def cls_attention(scores: torch.Tensor) -> torch.Tensor:
    """The [CLS] row of one layer's attention probabilities averaged over heads: ``[B, T]``.

    Args:
        scores: pre-softmax scores ``[B, H, T, T]`` with the additive padding mask in them (as captured by
            :func:`kdlsq_pl.models.attention.capture_attention_scores`), so padded keys get probability 0.
    """
    return torch.softmax(scores[:, :, 0, :].float(), dim=-1).mean(dim=1)


def token_ranking(attention_mask: torch.Tensor, k: int, rule: str, cls_attn: torch.Tensor | None = None,
                  sep: torch.Tensor | None = None, keep_sep: bool = False) -> torch.Tensor:
    """Which tokens of each example are kept: a ``[B, T]`` bool mask with ``min(k, eligible)`` True per row.

    ``first``: the first ``k`` real tokens ([CLS] first). ``cls_attention``: the ``k`` real tokens with the highest
    ``cls_attn`` (``[B, T]``, :func:`cls_attention`), [SEP] tokens (``sep`` ``[B, T]`` bool) not eligible unless
    ``keep_sep``; ties go to the earlier position.
    """
    real = attention_mask.bool()
    if rule == "first":
        return real & (real.long().cumsum(-1) <= k)
    if cls_attn is None:
        raise ValueError("token_ranking(rule='cls_attention') needs the teacher's [CLS] attention")
    eligible = real if keep_sep or sep is None else real & ~sep.bool()
    key = torch.where(eligible, cls_attn.float(), torch.tensor(-1.0))  # probabilities >= 0: ineligible sort last
    order = key.argsort(dim=-1, descending=True, stable=True)  # stable: ties keep the earlier position first
    kept = torch.zeros_like(eligible)
    kept.scatter_(1, order[:, :k], True)
    return kept & eligible


def width_mask(hidden: torch.Tensor, fraction: float, rule: str, layer: int, seed: int = 0) -> torch.Tensor:
    """Which dimensions of each hidden vector are kept: ``[B, T, D]`` bool with ``ceil(fraction * D)`` True per vector.

    ``magnitude``: the largest ``|hidden|`` per (example, token) (exact ties: ``torch.topk``'s pick); ``random``: one random
    set of dimensions for the layer, drawn from ``seed`` and ``layer`` (the same for every token and example).
    """
    B, T, D = hidden.shape
    m = max(1, math.ceil(float(fraction) * D - 1e-9))
    keep = torch.zeros(B, T, D, dtype=torch.bool)
    if rule == "random":
        g = torch.Generator().manual_seed(int(seed) * 1000003 + int(layer))
        keep[:, :, torch.randperm(D, generator=g)[:m]] = True
        return keep
    top = hidden.detach().abs().float().topk(m, dim=-1, sorted=False).indices
    return keep.scatter_(-1, top, True)


def selection_masks(sel: HiddenSelection, teacher_hidden: Sequence[torch.Tensor | None], attention_mask: torch.Tensor,
                    teacher_scores: Sequence[torch.Tensor] | None = None, sep: torch.Tensor | None = None,
                    layers: Sequence[int] | None = None) -> list[torch.Tensor | None]:
    """Per teacher hidden state ``j`` (0..L_t), the kept entries: ``[B, T, D]`` bool (``[B, T]`` without a width
    budget), or ``None`` for a state not in ``layers`` (default: every state).

    The token ranking of state ``j`` uses the [CLS] attention of the teacher layer that reads it, ``min(j, L_t - 1)``.

    Args:
        teacher_hidden: ``L_t + 1`` tensors ``[B, T, D]`` (``None`` allowed outside ``layers``).
        attention_mask: ``[B, T]``. teacher_scores: ``L_t`` tensors ``[B, H, T, T]`` (``cls_attention`` only).
        sep: ``[B, T]`` bool, True at [SEP] tokens.
    """
    n_t = len(teacher_hidden) - 1
    wanted = range(n_t + 1) if layers is None else layers
    out: list[torch.Tensor | None] = [None] * (n_t + 1)
    for j in wanted:
        if sel.tokens is None:
            tokens = attention_mask.bool()
        else:
            attn = cls_attention(teacher_scores[min(j, n_t - 1)]) if sel.needs_attention else None
            tokens = token_ranking(attention_mask, int(sel.tokens), sel.token_rule, attn, sep, sel.keep_sep)
        if sel.width is None:
            out[j] = tokens
        else:
            out[j] = width_mask(teacher_hidden[j], float(sel.width), sel.width_rule, j, sel.seed) & tokens[..., None]
    return out
