"""LightningModules: the full-precision teacher fine-tune and the KDLSQ student.

Both share ``GLUEModule``: GLUE evaluation on every dev split with torchmetrics (or, for a question
answering task, SQuAD's span decoding and exact match / F1), logged as ``val/<metric>`` and
``val/<metric>_best`` (x100), and AdamW with a linear schedule.

Question answering (``task.kind: qa``) goes through the same loops: :func:`head_logits` stacks a span
head's start and end logits as rows, so the soft cross-entropy, the ground-truth cross-entropy and the
evaluation see one ``[2B, T]`` "classification over token positions", and :func:`targets` stacks the gold
start and end positions the same way.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from kdlsq_pl.data.glue import model_inputs
from kdlsq_pl.metrics import build_metrics, predictions
from kdlsq_pl.models.attention import capture_attention_scores
from kdlsq_pl.models.layout import no_decay_parameter_names
from kdlsq_pl.models.loading import is_qa, is_regression
from kdlsq_pl.options import AdamWImpl, TeacherDtype, allowed
from kdlsq_pl.quant.modules import lsq_quantizers

log = logging.getLogger("kdlsq_pl")

#: Batch keys that are targets, not model inputs: class ids / scores (GLUE) or answer token positions (SQuAD).
TARGET_KEYS = ("labels", "start_positions", "end_positions")
#: The logit given to padded positions of a span head (``exp`` of it is 0 in float32).
MASKED_LOGIT = -1.0e4


def head_logits(out: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The task head's logits as one tensor: ``out.logits`` ``[B, C]`` for a classifier, or for a span head
    (``start_logits``, ``end_logits`` ``[B, T]``) ``torch.cat([start, end])`` ``[2B, T]`` with padded positions
    (``batch["attention_mask"] == 0``) set to :data:`MASKED_LOGIT`, so a softmax over a row puts no mass on padding."""
    start = getattr(out, "start_logits", None)
    if start is None:
        return out.logits
    pad = batch["attention_mask"] == 0
    return torch.cat([start.masked_fill(pad, MASKED_LOGIT), out.end_logits.masked_fill(pad, MASKED_LOGIT)])


def targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The targets matching :func:`head_logits`: ``labels`` ``[B]``, or ``cat([start_positions, end_positions])`` ``[2B]``."""
    if "start_positions" in batch:
        return torch.cat([batch["start_positions"], batch["end_positions"]])
    return batch["labels"]

def decay_groups(model: nn.Module, lr: float, weight_decay: float, exclude: Iterable[nn.Parameter] = ()) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters (minus ``exclude``): ``weight_decay`` on
    weights, none on biases and LayerNorm parameters (BERT's recipe; LayerNorms found by type,
    :func:`kdlsq_pl.models.layout.no_decay_parameter_names`)."""
    skip = {id(p) for p in exclude}
    no_decay = no_decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
    return [
        {"params": [p for n, p in named if n not in no_decay], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for n, p in named if n in no_decay], "lr": lr, "weight_decay": 0.0},
    ]


def adamw_optimizer(params: Iterable, impl: str, **defaults: Any) -> torch.optim.AdamW:
    """torch's AdamW in implementation ``impl`` (``optim.adamw``): ``"foreach"`` (asked for explicitly: on CPU torch
    would pick its per-tensor loop, the same numbers in more passes) or ``"fused"``; ``defaults`` as AdamW's."""
    return torch.optim.AdamW(params, foreach=impl == "foreach", fused=impl == "fused" or None, **defaults)


class GLUEModule(pl.LightningModule):
    """Evaluation and optimisation shared by the teacher and student stages.

    Subclasses implement ``eval_logits(batch) -> [B, C]`` (``[B, 1]`` for regression) and
    ``parameter_groups() -> list[dict]``.

    Args:
        task: the task config (``labels``, ``metrics``, ``metric``, ``dev_files``).
        warmup_ratio: share of the training steps with linear warm-up (0 for none).
        adamw: torch AdamW's implementation (``optim.adamw``): ``"foreach"`` (the default: the same numbers as
            torch's per-tensor loop, ``torch.equal``, in fewer passes and temporaries) or ``"fused"`` (one C++
            pass per tensor, several times faster again; its rounding differs in the last bit, so the numbers
            change a little).

    Raises:
        ValueError: ``adamw`` is not one of those two.
    """

    def __init__(self, task: Mapping[str, Any], warmup_ratio: float = 0.0, adamw: str = "foreach"):
        super().__init__()
        if adamw not in allowed(AdamWImpl):
            raise ValueError(f"optim.adamw={adamw!r} is not supported; allowed: {', '.join(allowed(AdamWImpl))}")
        self.adamw = adamw
        self.task = dict(task)
        self.is_qa, self.is_regression = is_qa(task), is_regression(task)
        self.dev_keys = list(task["dev_files"])
        self.val_metrics = nn.ModuleList([] if self.is_qa else [build_metrics(task) for _ in self.dev_keys])
        if self.is_qa:
            from kdlsq_pl.data.squad import SpanEvaluator
            self.spans = SpanEvaluator()
        self.warmup_ratio = warmup_ratio
        self.best: dict[str, float] = {}  # running maximum of each metric (logged as val/<metric>_best)
        self.best_row: dict[str, float] = {}  # every metric of the evaluation with the best task metric (the best checkpoint's)
        self.last: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        """Re-register transformers' output recorders in this process.

        transformers 5 records ``hidden_states`` through a per-process registry filled in
        ``PreTrainedModel.__init__``; a model unpickled in a spawned DDP worker skips ``__init__``
        and would return ``hidden_states=None``.
        """
        try:
            from transformers import PreTrainedModel
            from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
        except ImportError:  # other transformers versions keep no such registry
            return
        for m in self.modules():
            if isinstance(m, PreTrainedModel):
                _CAN_RECORD_REGISTRY[m] = m._can_record_outputs

    # ----- evaluation -------------------------------------------------------------------------
    def eval_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def metric_name(self, metric: str, dev_index: int) -> str:
        """``acc`` for a single dev split, ``acc_m`` / ``acc_mm`` for MNLI's two."""
        return metric if len(self.dev_keys) == 1 else f"{metric}_{self.dev_keys[dev_index]}"

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.eval_logits(batch)
        if self.is_qa:
            start, end = logits.chunk(2)
            self.spans.update(batch["idx"], start, end, batch["attention_mask"])
            return
        self.val_metrics[dataloader_idx].update(predictions(logits, self.is_regression), batch["labels"])

    def _dev_values(self) -> dict[str, float]:
        """This evaluation's metrics (x100), and the metric state reset for the next one."""
        if self.is_qa:  # decoded against the datamodule's evaluation examples
            values = {} if self.trainer.sanity_checking else self.trainer.datamodule.score(self.spans)
            self.spans.reset()
            return {name: value for name, value in values.items() if name in self.task["metrics"]}
        values = {}
        for i, collection in enumerate(self.val_metrics):
            for name, value in collection.compute().items():
                values[self.metric_name(name, i)] = 100.0 * float(value)
            collection.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._dev_values()
        if self.trainer.sanity_checking:
            return
        values = {name: value if math.isfinite(value) else 0.0 for name, value in values.items()}
        primary = self.task["metric"]  # already the logged name: f1, or acc_m for MNLI
        if primary in values and values[primary] > self.best_row.get(primary, -math.inf):  # strictly better, as ModelCheckpoint
            self.best_row = dict(values)
        for name, value in values.items():
            self.last[name] = value
            self.best[name] = max(self.best.get(name, -math.inf), value)
            self.log(f"val/{name}", value, prog_bar=name == self.task["metric"])
            self.log(f"val/{name}_best", self.best[name])
        log.info("epoch %d step %d: %s", self.current_epoch, self.global_step,
                 ", ".join(f"val/{k}={v:.2f} (best {self.best[k]:.2f})" for k, v in values.items()))

    def metrics_from_trainer(self) -> None:
        """Fill ``last``/``best`` from ``trainer.callback_metrics`` when validation ran in other processes
        (``ddp_spawn`` returns the logged metrics to the main process, not module attributes)."""
        if self.last or self.trainer is None:
            return
        for key, value in self.trainer.callback_metrics.items():
            name = key.removeprefix("val/")
            if key.startswith("val/") and not name.endswith("_best"):
                self.last[name] = float(value)
                self.best[name] = float(self.trainer.callback_metrics.get(f"{key}_best", value))
        self.best_row = self.best_row or dict(self.best)  # other processes' rows are not returned: the running maxima

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["glue_best"], checkpoint["glue_last"] = dict(self.best), dict(self.last)
        checkpoint["glue_best_row"] = dict(self.best_row)
        checkpoint["torch_rng_state"] = torch.get_rng_state()  # dropout masks continue as if never stopped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best = dict(checkpoint.get("glue_best", {}))
        self.best_row = dict(checkpoint.get("glue_best_row", {}))
        self.last = dict(checkpoint.get("glue_last", {}))
        self._rng_to_restore = checkpoint.get("torch_rng_state")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The RNG goes back at the first step after a resume, not at load time: between the two, new
        # data-loader iterators draw from it, which the interrupted run had drawn long before.
        if getattr(self, "_rng_to_restore", None) is not None:
            torch.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ----- optimisation -----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        raise NotImplementedError

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over :meth:`parameter_groups` in the ``adamw`` implementation (torch's own; ``foreach`` explicitly,
        since on CPU torch would otherwise pick its per-tensor loop)."""
        return adamw_optimizer(self.parameter_groups(), self.adamw)

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TeacherModule(GLUEModule):
    """Full-precision fine-tuning of a Hugging Face sequence classifier or span model (the teacher stage).

    Loss: cross-entropy, or MSE for regression (STS-B), as computed by the Hugging Face head; for question
    answering Hugging Face's span loss, the mean of the start and end positions' cross-entropies.

    Args:
        model: ``AutoModelForSequenceClassification`` (``AutoModelForQuestionAnswering`` for ``task.kind: qa``).
        task: the task config.
        lr, weight_decay, warmup_ratio: AdamW and schedule settings (``task.teacher``).
    """

    def __init__(self, model: nn.Module, task: Mapping[str, Any], lr: float, weight_decay: float, warmup_ratio: float):
        super().__init__(task, warmup_ratio)
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps module modes
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**model_inputs(batch), **{k: batch[k] for k in TARGET_KEYS if k in batch}).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def eval_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return head_logits(self.model(**model_inputs(batch)), batch)

    def parameter_groups(self) -> list[dict]:
        return decay_groups(self.model, self.lr, self.weight_decay)


class KDLSQModule(GLUEModule):
    """KDLSQ: a frozen full-precision teacher distils into a fake-quantized student.

    Source: Jin et al., "KDLSQ-BERT", arXiv 2101.05938, and the authors' released code. The loss is
    ``KDLoss`` (``kdlsq_pl.distill.losses``): soft cross-entropy to the teacher logits, MSE on the
    pre-softmax attention scores of every layer and on the hidden states, optional ground truth.
    Quantizers are inserted into ``student`` by ``QuantizationCallback`` before training.

    The same module trains the baselines (``conf/method``): TernaryBERT is this loop with other
    quantizers and weights; LSQ and Q8BERT pass ``teacher=None`` with a task-loss-only ``KDLoss``.
    With a ``teacher_cache`` (``kdlsq_pl.distill.teacher_cache``) the teacher's outputs are read by
    example id (``batch["idx"]``) and no teacher is loaded.

    Args:
        teacher: fine-tuned classifier (kept in eval mode, no grad), or ``None`` when the loss uses
            no teacher term (``loss.uses_teacher`` is False).
        student: a copy of the same checkpoint, trained.
        task: the task config.
        loss: the distillation loss.
        optim: ``lr``, ``weight_decay`` (model weights), ``weight_step_lr``,
            ``weight_step_weight_decay`` (weight/embedding step sizes), ``act_step_lr``,
            ``act_step_weight_decay`` (activation step sizes), ``warmup_ratio``, ``adamw`` (see :class:`GLUEModule`).
        teacher_cache: a ``TeacherCache`` to read instead of running ``teacher`` (then ``None``); the
            loss must have ``mask_padding=True`` (the cache holds no padding).
        selection: a minimal-knowledge ``HiddenSelection`` (``kdlsq_pl.distill.selection``): the live teacher's
            hidden states get the selection's masks (``hidden_masks``), as a cache built with it stores them.
        sep_token_id: the tokenizer's [SEP] id (a selection that excludes [SEP]).
        teacher_dtype: ``"float32"`` or ``"bfloat16"``: the live teacher's forward under CPU/CUDA autocast in bfloat16
            (its outputs cast back to float32 for the loss; ``teacher.forward_dtype``). Changes the numbers a little.

    Raises:
        ValueError: the loss needs a teacher and neither a teacher nor a cache is given; a cache with
            a loss that averages over padding.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, task: Mapping[str, Any], loss: nn.Module, optim: Mapping[str, Any],
                 teacher_cache: Any = None, selection: Any = None, sep_token_id: int | None = None, teacher_dtype: str = "float32"):
        super().__init__(task, float(optim.get("warmup_ratio", 0.0)), str(optim.get("adamw", "foreach")))
        if teacher is None and teacher_cache is None and loss.uses_teacher:
            raise ValueError(f"the loss ({loss.extra_repr()}) distils from a teacher, but teacher=None")
        if teacher_cache is not None and not loss.mask_padding:
            raise ValueError("a teacher cache stores no padded positions: the loss needs mask_padding=True")
        self.teacher_cache = teacher_cache
        self.teacher = teacher.eval() if teacher is not None else None
        for p in self.teacher.parameters() if teacher is not None else ():
            p.requires_grad_(False)
        self.student = student.train()
        self.loss = loss
        self.optim = dict(optim)
        self.selection = None if selection is None or selection.is_full else selection
        self.sep_token_id = sep_token_id
        if teacher_dtype not in allowed(TeacherDtype):
            raise ValueError(f"teacher_dtype={teacher_dtype!r} is not supported; allowed: {', '.join(allowed(TeacherDtype))}")
        self.teacher_dtype = teacher_dtype

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _outputs(self, model: nn.Module, batch: Mapping[str, torch.Tensor], epoch: int | None = None, scores_for_selection: bool = False,
                 consume: Any = None) -> dict:
        """Logits, hidden states and attention scores of ``model`` on ``batch``; with ``consume``
        (``KDLoss.attention_consumer``) the attention terms computed layer by layer instead of the scores."""
        w = self.loss.weights_at(epoch)
        need_scores, need_hidden = w["attn"] > 0 or (scores_for_selection and w["hidden"] > 0), w["hidden"] > 0
        with capture_attention_scores(consume if need_scores else None) as scores:
            out = model(**model_inputs(batch), output_hidden_states=need_hidden)
        streamed = consume is not None and need_scores
        return {"logits": head_logits(out, batch), "hidden_states": out.hidden_states if need_hidden else None,
                "attention_scores": scores if need_scores and not streamed else None,
                "attention_terms": scores if streamed else None}

    def _teacher_outputs(self, batch: Mapping[str, torch.Tensor], epoch: int | None, scores_for_selection: bool) -> dict:
        """The live teacher's outputs; with ``teacher_dtype="bfloat16"`` its forward runs under autocast and every
        output comes back as float32."""
        if self.teacher_dtype == "float32":
            return self._outputs(self.teacher, batch, epoch, scores_for_selection=scores_for_selection)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self._outputs(self.teacher, batch, epoch, scores_for_selection=scores_for_selection)
        as_float = lambda x: None if x is None else x.float()  # noqa: E731
        return {"logits": as_float(out["logits"]),
                "hidden_states": None if out["hidden_states"] is None else [as_float(h) for h in out["hidden_states"]],
                "attention_scores": None if out["attention_scores"] is None else [as_float(a) for a in out["attention_scores"]]}

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        teacher_out = None
        epoch = self.current_epoch  # two-stage losses (loss.intermediate_epochs) switch terms by epoch
        if self.teacher_cache is not None:
            teacher_out = self.teacher_cache.lookup(batch["idx"], batch["input_ids"].shape[1], self.device)
        elif self.teacher is not None:
            sel = self.selection
            with torch.no_grad():
                teacher_out = self._teacher_outputs(batch, epoch, scores_for_selection=sel is not None and sel.needs_attention)
                if sel is not None and teacher_out["hidden_states"] is not None:  # the kept entries, as a cache stores them
                    from kdlsq_pl.distill.selection import selection_masks
                    sep = batch["input_ids"] == self.sep_token_id if self.sep_token_id is not None else None
                    wanted = [j for j in (self.loss.hidden_map or range(len(teacher_out["hidden_states"]))) if j is not None]
                    teacher_out["hidden_masks"] = selection_masks(sel, teacher_out["hidden_states"], batch["attention_mask"],
                                                                  teacher_out["attention_scores"], sep, layers=wanted)
            teacher_out["mask"] = batch["attention_mask"].bool()  # used by a loss with mask_padding=True
        # each layer's attention term is computed as the layer runs, so no layer's scores outlive it (peak memory)
        consume = None if teacher_out is None else self.loss.attention_consumer(teacher_out, self.student.config.num_hidden_layers, epoch)
        student_out = self._outputs(self.student, batch, epoch, consume=consume)
        total, parts = self.loss(student_out, teacher_out, targets(batch), epoch=epoch)
        self.log("train/loss", total, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value)
        return total

    def eval_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return head_logits(self.student(**model_inputs(batch)), batch)

    def parameter_groups(self) -> list[dict]:
        """Model weights (decay except bias/LayerNorm), weight step sizes, activation step sizes."""
        qs = lsq_quantizers(self.student)
        o = self.optim
        groups = decay_groups(self.student, o["lr"], o["weight_decay"], exclude=[q.scale for q in qs.values()])
        for kind, lr, wd in (("weight", o["weight_step_lr"], o["weight_step_weight_decay"]),
                             ("activation", o["act_step_lr"], o["act_step_weight_decay"])):
            params = [q.scale for q in qs.values() if q.kind == kind]
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{kind}_step"})
        return [g for g in groups if g["params"]]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints hold the student only (the teacher comes from the store): put the loaded teacher's own
        tensors in for the ``teacher.`` keys, so the strict load still fails on anything else missing (a
        quantizer's step size, a student weight)."""
        super().on_load_checkpoint(checkpoint)
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
