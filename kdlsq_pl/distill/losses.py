"""Knowledge-distillation loss terms for KDLSQ-BERT.

Source: Jin et al., "KDLSQ-BERT: A Quantized Bert Combining Knowledge Distillation with
Learned Step Size Quantization" (arXiv:2101.05938), whose released code reuses the
TinyBERT ``task_distill.py`` loss terms (Jiao et al., arXiv:1909.10351):

* prediction layer: ``soft_cross_entropy`` = ``(-softmax(z_T/T) * log_softmax(z_S/T)).mean()``;
* attention: MSE between *pre-softmax* attention scores, entries ``<= -100`` (masked
  positions) zeroed, summed over the mapped layers;
* hidden states: MSE between embedding output + every layer output, summed;
* layer mapping for a shallower student: attention ``i <- i*k + k - 1``, hidden ``i <- i*k``;
* regression tasks (STS-B): the prediction loss is MSE against the gold label.

The total loss is ``sum_k weight_k * term_k`` over the enabled (nonzero-weight) terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlsq_pl.options import Reduction, allowed

__all__ = [
    "KDLoss",
    "attention_score_mse",
    "hidden_state_mse",
    "layer_map",
    "regression_mse",
    "soft_cross_entropy",
]

_REDUCTIONS = allowed(Reduction)  # the config schema's values (loss.pred_reduction)
_REGRESSION_TARGETS = ("label", "teacher")


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft cross-entropy of student logits against teacher soft targets.

    ``l[b, c] = -softmax(z_T[b] / T)[c] * log_softmax(z_S[b] / T)[c]``.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]`` (used as fixed targets; pass detached / no-grad tensors).
        temperature: ``T > 0``; no ``T**2`` rescaling (as in the released code).
        reduction: ``"mean"`` averages ``l`` over all ``B x C`` entries (TinyBERT /
            KDLSQ released code; equals ``1/C`` times the per-example CE averaged over the
            batch); ``"batchmean"`` sums over classes and averages over the batch
            (the textbook per-example soft CE).

    Returns:
        scalar tensor.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; allowed: {list(_REDUCTIONS)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"expected student/teacher logits of equal shape [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    targets = F.softmax(teacher_logits.float() / temperature, dim=-1)
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_entry = -targets * log_probs
    if reduction == "mean":
        return per_entry.mean()
    return per_entry.sum(dim=-1).mean()


def attention_score_mse(
    student_scores: Sequence[torch.Tensor],
    teacher_scores: Sequence[torch.Tensor],
    threshold: float = -100.0,
    mask: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Sum over layers of the MSE between pre-softmax attention scores.

    For each pair (``[B, H, T, T]`` each) entries ``<= threshold`` are set to 0 in the
    student and (independently) in the teacher tensor -- this removes the additive
    padding mask (``torch.finfo(dtype).min`` in transformers 5, -10000 in old BERT) so the
    loss stays finite -- then ``mean((s - t)**2)`` over ``B x H x T x T``; the layer terms
    are summed (TinyBERT / KDLSQ released code: ``att_loss += loss_mse(s, t)``).

    With ``mask`` (``[B, T]`` bool, True at the positions that count, e.g. the real tokens) the mean
    runs over the ``(query, key)`` pairs whose two positions are both True, x ``H`` heads, so
    padding (which depends on the batch) drops out. ``mask=None`` is the released code's mean over
    every entry, padded rows included.

    ``fused``: on float32 CPU tensors use the one-pass C++ kernel (:mod:`kdlsq_pl.kernels`); the
    value and the gradient are bit-identical to the torch formula, which is used otherwise.

    The lists must already be layer-aligned (see :func:`layer_map`). Computed in float32.
    """
    _check_pairs("attention_score_mse", student_scores, teacher_scores)
    pairs = None if mask is None else (mask[:, None, :, None] & mask[:, None, None, :]).float()  # [B, 1, T, T]
    terms = []
    for s, t in zip(student_scores, teacher_scores):
        s = s.float()
        t = t.float()
        if fused and _AttentionMSE.applies(s, t):
            term = _AttentionMSE.apply(s.contiguous(), t.contiguous(), None if pairs is None else pairs[:, 0], threshold)
        else:
            s = torch.where(s <= threshold, 0.0, s)  # a scalar 0: one pass, no zeros tensor
            t = torch.where(t <= threshold, 0.0, t)
            if pairs is None:
                term = F.mse_loss(s, t, reduction="mean")
            else:
                term = ((s - t).square() * pairs).sum() / (pairs.sum() * s.shape[1]).clamp_min(1.0)
        terms.append(term)
    return _sum_in_order(terms, "attention score")


class _AttentionMSE(torch.autograd.Function):
    """One layer's attention-score MSE by the fused CPU kernel (``csrc/attention_mse_cpu.cpp``).

    ``s``, ``t``: ``[B, H, T, T]`` float32 contiguous (``t`` needs no gradient); ``pairs``: ``[B, T, T]`` float
    0/1 or None. Returns the same scalar as the torch formula of :func:`attention_score_mse`: ``e.mean()`` or
    ``e.sum() / max(pairs.sum() * H, 1)`` of the kernel's elementwise squares ``e``, summed by torch. For the
    backward it keeps one ``[B, H, T, T]`` tensor, the thresholded difference, instead of both score tensors, so
    the student's scores and the teacher's are freed once the loss is computed (one such tensor per layer less
    during the backward; 25 MB a layer at batch 32, length 128, 12 heads). The gradient equals the torch
    formula's (``torch.equal``; an entry at or below the threshold may be -0.0 instead of 0.0).
    """

    @staticmethod
    def applies(s: torch.Tensor, t: torch.Tensor) -> bool:
        from kdlsq_pl.kernels import cpu_kernels

        return (s.device.type == "cpu" and s.dtype == torch.float32 and t.dtype == torch.float32 and s.dim() == 4
                and s.shape == t.shape and not t.requires_grad and cpu_kernels() is not None)

    @staticmethod
    def forward(ctx, s, t, pairs, threshold):  # type: ignore[override]
        from kdlsq_pl.kernels import cpu_kernels

        pairs = None if pairs is None else pairs.contiguous()
        e, diff = cpu_kernels().attention_mse_forward(s, t, pairs, threshold)
        if pairs is None:
            term, ctx.denominator = e.mean(), None
        else:
            ctx.denominator = (pairs.sum() * s.shape[1]).clamp_min(1.0)
            term = e.sum() / ctx.denominator
        ctx.save_for_backward(diff, pairs)
        return term

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from kdlsq_pl.kernels import cpu_kernels

        diff, pairs = ctx.saved_tensors
        if pairs is None:  # F.mse_loss's backward: (2/N * d) * grad
            coef, g = 2.0 / diff.numel(), float(grad)
        else:  # through "/ D", "* pairs" and "square": (grad / D * pairs) * (2 * d)
            coef, g = float(grad / ctx.denominator), 1.0
        return cpu_kernels().attention_mse_backward(diff, pairs, coef, g), None, None, None


def hidden_state_mse(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers of ``mean((h_S - h_T)**2)`` over ``B x T x D``.

    The lists hold ``L + 1`` tensors ``[B, T, D]`` (embedding output + every layer output,
    as returned by ``output_hidden_states=True``), already layer-aligned. Student and
    teacher hidden sizes must match (no TinyBERT ``fit_dense`` projection: the KDLSQ
    student has the teacher's width). With ``mask`` (``[B, T]`` bool) the mean runs over the True
    positions x ``D`` only; a list of masks gives each layer its own, ``[B, T]`` or ``[B, T, D]`` (the kept
    entries of a minimal-knowledge selection, :mod:`kdlsq_pl.distill.selection`), the mean running over that
    layer's True entries. Computed in float32.
    """
    _check_pairs("hidden_state_mse", student_hidden, teacher_hidden)
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(student_hidden)
    terms = []
    for s, t, m in zip(student_hidden, teacher_hidden, masks):
        weight = None if m is None else (m[..., None] if m.dim() == 2 else m).float()  # [B, T, 1] or [B, T, D]
        if weight is None:
            term = F.mse_loss(s.float(), t.float(), reduction="mean")
        else:
            per_entry = s.shape[-1] if weight.shape[-1] == 1 else 1
            term = ((s.float() - t.float()).square() * weight).sum() / (weight.sum() * per_entry).clamp_min(1.0)
        terms.append(term)
    return _sum_in_order(terms, "hidden state")


def layer_map(n_student: int, n_teacher: int) -> tuple[list[int], list[int]]:
    """Teacher indices matched to each student layer (TinyBERT uniform mapping).

    With ``k = n_teacher // n_student`` (``n_teacher % n_student`` must be 0):

    * attention (list of ``L`` per-layer tensors): student layer ``i`` <- teacher layer
      ``i*k + k - 1`` for ``i = 0..n_student-1``;
    * hidden states (list of ``L + 1`` tensors, index 0 = embeddings): student ``i`` <-
      teacher ``i*k`` for ``i = 0..n_student``.

    Equal depth gives the identity. Returns ``(attn_indices, hidden_indices)``.
    """
    if n_student <= 0 or n_teacher <= 0:
        raise ValueError(f"layer counts must be positive, got n_student={n_student}, n_teacher={n_teacher}")
    if n_teacher % n_student != 0:
        raise ValueError(
            f"n_teacher={n_teacher} must be a multiple of n_student={n_student} for the uniform layer map"
        )
    k = n_teacher // n_student
    attn = [i * k + k - 1 for i in range(n_student)]
    hidden = [i * k for i in range(n_student + 1)]
    return attn, hidden


def regression_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE for regression heads: ``pred`` ``[B]`` or ``[B, 1]``, ``target`` ``[B]`` (or ``[B, 1]``).

    Both are flattened to ``[B]`` (TinyBERT: ``loss_mse(logits.view(-1), labels.view(-1))``).
    """
    p = pred.reshape(-1).float()
    t = target.reshape(-1).to(p.dtype)
    if p.shape != t.shape:
        raise ValueError(f"regression_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    return F.mse_loss(p, t, reduction="mean")


def reads_teacher(weights: Mapping[str, float], is_regression: bool, regression_target: str) -> bool:
    """Whether a loss with these term ``weights`` (``pred``, ``attn``, ``hidden``; ``gt`` reads the gold labels) reads
    the teacher's outputs: the attention or hidden-state term, or the prediction term unless it is a regression
    task's against the gold score (``regression_target="label"``, the released code's STS-B)."""
    pred_teacher = weights.get("pred", 0) > 0 and not (is_regression and regression_target == "label")
    return pred_teacher or weights.get("attn", 0) > 0 or weights.get("hidden", 0) > 0


def _check_pairs(name: str, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name}: got {len(a)} student tensors but {len(b)} teacher tensors")
    if len(a) == 0:
        raise ValueError(f"{name}: empty tensor lists")
    for i, (s, t) in enumerate(zip(a, b)):
        if s.shape != t.shape:
            raise ValueError(f"{name}: layer {i} shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")


def _get(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


class KDLoss(nn.Module):
    """Weighted KDLSQ distillation objective.

    ``total = pred * L_pred + attn * L_attn + hidden * L_hidden + gt * L_gt``.

    Args:
        pred: weight of the prediction-layer term. Classification: :func:`soft_cross_entropy`
            of student vs teacher logits. Regression: :func:`regression_mse` of the student
            prediction vs the label (``regression_target="label"``, released code) or vs the
            teacher prediction (``"teacher"``).
        attn: weight of :func:`attention_score_mse` over layer-mapped pre-softmax scores.
        hidden: weight of :func:`hidden_state_mse` over layer-mapped hidden states.
        gt: weight of the ground-truth term: ``F.cross_entropy(logits, labels)`` for
            classification, :func:`regression_mse` vs label for regression.
        temperature: soft-CE temperature.
        pred_reduction: ``"mean"`` or ``"batchmean"`` (see :func:`soft_cross_entropy`).
        is_regression: regression head (``logits`` ``[B, 1]``).
        regression_target: ``"label"`` or ``"teacher"``.
        attn_threshold: masked-score threshold for the attention term (-100).
        mask_padding: average the attention and hidden terms over the positions in the teacher
            output's ``mask`` (``[B, T]`` bool: the real tokens, or the tokens a teacher-output cache
            kept) instead of every padded position (the released code). Needed by the cache, which
            stores no padding; the live teacher passes ``attention_mask``.
        intermediate_epochs: two-stage training as TinyBERT and TernaryBERT (Jiao et al. 2020, section
            3.2; Zhang et al. 2020): for the first ``k`` epochs only the intermediate terms (attention and
            hidden states), then only the prediction terms (pred and gt). 0 (default, the released KDLSQ
            code): every term throughout. See :meth:`weights_at`.
        hidden_map: the teacher hidden state for each student one (``L_s + 1`` entries, ``None``: not distilled),
            e.g. :func:`kdlsq_pl.distill.selection.depth_map`; default the uniform :func:`layer_map`. A teacher
            output with ``hidden_masks`` (one per teacher state, ``[B, T]`` or ``[B, T, D]`` bool) averages each
            hidden pair over its own kept entries (a minimal-knowledge selection).

    Calling ``loss(student_out, teacher_out, labels, n_student_layers, n_teacher_layers)``
    where each ``*_out`` is a dict or object with ``logits`` ``[B, C]``, ``hidden_states``
    (list of ``L + 1`` ``[B, T, D]``) and ``attention_scores`` (list of ``L``
    ``[B, H, T, T]``, e.g. from ``capture_attention_scores``) returns ``(total, parts)``.
    ``parts`` maps ``"pred" / "attn" / "hidden" / "gt"`` to the *unweighted* term, and only
    holds terms whose weight is nonzero (zero-weight terms are never computed, so their
    inputs may be missing). If a layer count is ``None`` it is inferred from the lists. A teacher
    list entry that is ``None`` (a layer a teacher-output cache left out) drops that layer pair.
    Teacher tensors are detached. A student output may hold ``attention_terms`` (one per student layer, the
    layer's attention term or ``None``, from :meth:`attention_consumer`) in place of ``attention_scores``: the
    same numbers, computed while the student's forward ran.
    """

    TERMS = ("pred", "attn", "hidden", "gt")

    def __init__(
        self,
        pred: float = 1.0,
        attn: float = 0.0,
        hidden: float = 0.0,
        gt: float = 0.0,
        temperature: float = 1.0,
        pred_reduction: str = "mean",
        is_regression: bool = False,
        regression_target: str = "label",
        attn_threshold: float = -100.0,
        mask_padding: bool = False,
        intermediate_epochs: int = 0,
        hidden_map: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        weights = {"pred": pred, "attn": attn, "hidden": hidden, "gt": gt}
        for name, value in weights.items():
            try:
                ok = float(value) >= 0 and math.isfinite(float(value))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"KDLoss weight {name!r} must be a finite number >= 0, got {value!r}")
        if all(float(v) == 0.0 for v in weights.values()):
            raise ValueError("KDLoss: all weights (pred, attn, hidden, gt) are zero; nothing to optimise")
        if pred_reduction not in _REDUCTIONS:
            raise ValueError(f"pred_reduction={pred_reduction!r} is not supported; allowed: {list(_REDUCTIONS)}")
        if regression_target not in _REGRESSION_TARGETS:
            raise ValueError(
                f"regression_target={regression_target!r} is not supported; allowed: {list(_REGRESSION_TARGETS)}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.temperature = float(temperature)
        self.pred_reduction = pred_reduction
        self.is_regression = bool(is_regression)
        self.regression_target = regression_target
        self.attn_threshold = float(attn_threshold)
        self.mask_padding = bool(mask_padding)
        if isinstance(intermediate_epochs, bool) or not isinstance(intermediate_epochs, int) or intermediate_epochs < 0:
            raise ValueError(f"intermediate_epochs must be an integer >= 0, got {intermediate_epochs!r}")
        if intermediate_epochs and (self.weights["attn"] + self.weights["hidden"] == 0 or self.weights["pred"] + self.weights["gt"] == 0):
            raise ValueError("intermediate_epochs > 0 needs an intermediate term (attn or hidden) and a prediction term (pred or gt)")
        self.intermediate_epochs = intermediate_epochs
        self.hidden_map = None if hidden_map is None else list(hidden_map)

    def weights_at(self, epoch: int | None) -> dict[str, float]:
        """The term weights in effect at ``epoch`` (0-based; ``None``: every term, as without stages).

        With ``intermediate_epochs = k > 0``: epochs ``< k`` keep ``attn`` and ``hidden`` and zero ``pred``
        and ``gt``; later epochs the reverse.
        """
        if not self.intermediate_epochs or epoch is None:
            return dict(self.weights)
        off = ("pred", "gt") if epoch < self.intermediate_epochs else ("attn", "hidden")
        return {k: 0.0 if k in off else v for k, v in self.weights.items()}

    @property
    def uses_teacher(self) -> bool:
        """Whether any weighted term reads the teacher's outputs (:func:`reads_teacher`)."""
        return reads_teacher(self.weights, self.is_regression, self.regression_target)

    def extra_repr(self) -> str:
        w = ", ".join(f"{k}={v}" for k, v in self.weights.items())
        return (
            f"{w}, temperature={self.temperature}, pred_reduction={self.pred_reduction!r}, "
            f"is_regression={self.is_regression}, regression_target={self.regression_target!r}, "
            f"mask_padding={self.mask_padding}"
            + (f", intermediate_epochs={self.intermediate_epochs}" if self.intermediate_epochs else "")
        )

    def forward(
        self,
        student_out: Any,
        teacher_out: Any,
        labels: torch.Tensor | None,
        n_student_layers: int | None = None,
        n_teacher_layers: int | None = None,
        epoch: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        w = self.weights_at(epoch)

        if w["pred"] > 0:
            s_logits = _get(student_out, "logits")
            if self.is_regression:
                if self.regression_target == "label":
                    parts["pred"] = regression_mse(s_logits, _require(labels, "labels"))
                else:
                    parts["pred"] = regression_mse(s_logits, _get(teacher_out, "logits").detach())
            else:
                parts["pred"] = soft_cross_entropy(
                    s_logits,
                    _get(teacher_out, "logits").detach(),
                    temperature=self.temperature,
                    reduction=self.pred_reduction,
                )

        if w["attn"] > 0 or w["hidden"] > 0:
            n_s, n_t = self._layer_counts(student_out, teacher_out, n_student_layers, n_teacher_layers)
            attn_idx, hidden_idx = layer_map(n_s, n_t) if self.hidden_map is None else (layer_map(n_s, n_t)[0], self.hidden_map)
            mask = None
            if self.mask_padding:
                mask = _require(_get(teacher_out, "mask"), "teacher mask (mask_padding=True)").bool()
            hidden_masks = _get(teacher_out, "hidden_masks")  # a minimal-knowledge selection: per teacher state

            terms = _get(student_out, "attention_terms")
            if w["attn"] > 0 and terms is not None:  # computed layer by layer during the student's forward
                if len(terms) != n_s:
                    raise ValueError(f"expected {n_s} student attention terms, got {len(terms)}")
                parts["attn"] = _sum_in_order(terms, "attention score")
            elif w["attn"] > 0:
                s_att = list(_require(_get(student_out, "attention_scores"), "student attention_scores"))
                t_att = list(_require(_get(teacher_out, "attention_scores"), "teacher attention_scores"))
                if len(s_att) != n_s or len(t_att) != n_t:
                    raise ValueError(
                        f"expected {n_s} student / {n_t} teacher attention score tensors, "
                        f"got {len(s_att)} / {len(t_att)}"
                    )
                pairs = _present(s_att, t_att, attn_idx, "attention score")
                parts["attn"] = attention_score_mse(
                    [s for s, _ in pairs], [t for _, t in pairs], threshold=self.attn_threshold, mask=mask
                )

            if w["hidden"] > 0:
                s_hid = list(_require(_get(student_out, "hidden_states"), "student hidden_states"))
                t_hid = list(_require(_get(teacher_out, "hidden_states"), "teacher hidden_states"))
                if len(s_hid) != n_s + 1 or len(t_hid) != n_t + 1:
                    raise ValueError(
                        f"expected {n_s + 1} student / {n_t + 1} teacher hidden states (L+1), "
                        f"got {len(s_hid)} / {len(t_hid)}"
                    )
                pairs = _present(s_hid, t_hid, hidden_idx, "hidden state")
                if hidden_masks is not None:
                    per_layer = [hidden_masks[j] for j in hidden_idx if j is not None and t_hid[j] is not None]
                    parts["hidden"] = hidden_state_mse([s for s, _ in pairs], [t for _, t in pairs], mask=per_layer)
                else:
                    parts["hidden"] = hidden_state_mse([s for s, _ in pairs], [t for _, t in pairs], mask=mask)

        if w["gt"] > 0:
            s_logits = _get(student_out, "logits")
            y = _require(labels, "labels")
            if self.is_regression:
                parts["gt"] = regression_mse(s_logits, y)
            else:
                parts["gt"] = F.cross_entropy(s_logits.float(), y.long())

        total = None
        for name, value in parts.items():
            term = w[name] * value
            total = term if total is None else total + term
        return total, parts

    def attention_consumer(self, teacher_out: Any, n_student_layers: int, epoch: int | None = None) -> Callable | None:
        """A ``consume`` for :func:`kdlsq_pl.models.attention.capture_attention_scores` around the student's forward:
        it turns student layer ``i``'s scores into that layer's term of :func:`attention_score_mse` against its mapped
        teacher layer as soon as the layer has run, and drops its reference to that teacher tensor (the entry of
        ``teacher_out``'s list becomes ``None``). So neither side's ``[B, H, T, T]`` scores outlive their layer: at
        batch 32, length 128, 12 heads that is 25 MB a layer and side less at the end of the forward. The captured list
        is the student output's ``attention_terms``; :meth:`forward` sums it in layer order, the same number and
        gradient as from ``attention_scores``. ``None`` when the attention term has weight 0 at ``epoch``.

        Args:
            teacher_out: the teacher's outputs (``attention_scores``: ``L_t`` tensors ``[B, H, T, T]``; ``mask`` with
                ``mask_padding``).
            n_student_layers: the student's layer count (``config.num_hidden_layers``).
        """
        if self.weights_at(epoch)["attn"] <= 0:
            return None
        t_att = _require(_get(teacher_out, "attention_scores"), "teacher attention_scores")
        attn_idx = layer_map(int(n_student_layers), len(t_att))[0]
        mask = _require(_get(teacher_out, "mask"), "teacher mask (mask_padding=True)").bool() if self.mask_padding else None

        def consume(i: int, scores: torch.Tensor) -> torch.Tensor | None:
            j = attn_idx[i] if i < len(attn_idx) else None
            if j is None or t_att[j] is None:
                return None
            teacher, t_att[j] = t_att[j], None
            return attention_score_mse([scores], [teacher.detach()], threshold=self.attn_threshold, mask=mask)

        return consume

    @staticmethod
    def _layer_counts(student_out, teacher_out, n_s, n_t) -> tuple[int, int]:
        def infer(out, n):
            if n is not None:
                return int(n)
            att = _get(out, "attention_scores")
            att = _get(out, "attention_terms") if att is None else att
            if att is not None:
                return len(att)
            hid = _get(out, "hidden_states")
            if hid is not None:
                return len(hid) - 1
            raise ValueError("cannot infer the layer count: pass n_*_layers explicitly")

        return infer(student_out, n_s), infer(teacher_out, n_t)


def _present(student: list, teacher: list, mapped: list[int], what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(student[i], teacher[mapped[i]].detach())`` for every student layer mapped (``mapped[i]`` not None) to a
    present teacher tensor."""
    pairs = [(s, teacher[j].detach()) for s, j in zip(student, mapped) if j is not None and teacher[j] is not None]
    if not pairs:
        raise _none_mapped(what)
    return pairs


def _sum_in_order(terms: Sequence[torch.Tensor | None], what: str) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` left to right over the entries that are not None (per-layer loss terms: the
    order fixes the float32 rounding, so the streamed and the whole-list attention losses agree bit for bit).

    Raises:
        ValueError: every entry is None (no student layer had a teacher ``what`` tensor).
    """
    present = [x for x in terms if x is not None]
    if not present:
        raise _none_mapped(what)
    total = present[0]
    for x in present[1:]:
        total = total + x
    return total


def _none_mapped(what: str) -> ValueError:
    return ValueError(f"KDLoss: no teacher {what} tensor for any mapped layer (all None)")


def _require(x, what: str):
    if x is None:
        raise ValueError(f"KDLoss: {what} is required for an enabled term but was None")
    return x
