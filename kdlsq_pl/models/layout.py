"""Where a BERT-family classifier keeps the modules that KDLSQ quantizes, per architecture.

The quantizer surgery (``kdlsq_pl.quant.modules.quantize_``), the packed export, the teacher cache and
the optimizer's weight-decay groups read the model's own structure through this table instead of
BERT's attribute names: the encoder is ``model.base_model`` (``base_model_prefix``: ``bert``,
``roberta``, ``distilbert``), the layer list and the names inside a layer come from ``LAYOUTS``, layer
counts from the config (``num_hidden_layers``, which ``DistilBertConfig`` maps to ``n_layers``), and
normalisation layers are found by type (``nn.LayerNorm``), not by name.

The attention quantizers and the attention-score distillation work through transformers' attention
interface (``kdlsq_pl.models.attention``): an architecture qualifies when its self-attention module
calls ``ALL_ATTENTION_FUNCTIONS`` with ``[B, H, T, d_head]`` query/key/value. BERT, RoBERTa (and
MiniLM, a BERT) and DistilBERT do; DeBERTa's disentangled attention computes its scores itself, so it is
refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from torch import nn

from kdlsq_pl.errors import ConfigError


@dataclass(frozen=True)
class EncoderLayout:
    """Module paths of one architecture, relative to the encoder (``model.base_model``) unless noted.

    Attributes:
        embeddings: the word and position embedding tables (``nn.Embedding``), quantized at ``embedding_bits``.
        layers: the ``nn.ModuleList`` of transformer layers.
        linears: the Linears inside one layer, quantized at ``weight_bits`` with an input quantizer:
            Q, K, V, attention output, FFN in, FFN out (in that order).
        attention: the module inside one layer that calls the attention interface (it carries the
            Q/K/V/probability quantizers).
        head: Linears of the classification head that play BERT's pooler role, relative to the *top*
            model (the pooler dense for BERT, ``classifier.dense`` for RoBERTa, ``pre_classifier`` for
            DistilBERT); quantized when present. The final classifier Linear stays full precision.
    """

    embeddings: tuple[str, ...]
    layers: str
    linears: tuple[str, ...]
    attention: str
    head: tuple[str, ...]


_BERT_LAYER = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "intermediate.dense", "output.dense")

#: Supported ``config.model_type`` values and their layout.
LAYOUTS: dict[str, EncoderLayout] = {
    "bert": EncoderLayout(("embeddings.word_embeddings", "embeddings.position_embeddings"), "encoder.layer",
                          _BERT_LAYER, "attention.self", ("{base}.pooler.dense",)),
    "roberta": EncoderLayout(("embeddings.word_embeddings", "embeddings.position_embeddings"), "encoder.layer",
                             _BERT_LAYER, "attention.self", ("{base}.pooler.dense", "classifier.dense")),
    "distilbert": EncoderLayout(("embeddings.word_embeddings", "embeddings.position_embeddings"), "transformer.layer",
                                ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                                 "ffn.lin1", "ffn.lin2"), "attention", ("pre_classifier",)),
}

#: Model types known to compute attention outside transformers' attention interface.
NO_ATTENTION_INTERFACE = ("deberta", "deberta-v2", "sew-d")


def layout_for(model_type: str) -> EncoderLayout:
    """The ``EncoderLayout`` of ``config.model_type``.

    Raises:
        ConfigError: one line naming the model type: its attention does not go through transformers'
            attention interface (DeBERTa), or it has no layout entry; both list the supported types.
    """
    supported = ", ".join(LAYOUTS)
    if model_type in NO_ATTENTION_INTERFACE:
        raise ConfigError(f"model type {model_type!r} is not supported: its attention does not go through transformers' "
                          f"attention interface, so the attention quantizers and score distillation cannot reach it; "
                          f"supported: {supported}")
    if model_type not in LAYOUTS:
        raise ConfigError(f"model type {model_type!r} has no encoder layout for the quantizer surgery; supported: {supported}")
    return LAYOUTS[model_type]


def encoder_prefix(model: nn.Module) -> str:
    """Dotted path of the encoder inside ``model`` (``"bert"`` for a classifier, ``""`` for a bare encoder)."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and hasattr(model, prefix) else ""


def quantizable_modules(model: nn.Module) -> dict[str, list[str]]:
    """Dotted paths (from the top of ``model``) of what the surgery replaces, by role.

    Returns:
        ``{"embeddings": [...], "linears": [...], "attention": [...]}``: the embedding tables, every
        quantized Linear (layers in order, then the head's pooler-role Linears that exist), and the
        attention modules (one per layer).

    Raises:
        ConfigError: an unsupported model type (:func:`layout_for`).
    """
    layout = layout_for(model.config.model_type)
    base = encoder_prefix(model)
    join = (lambda p: f"{base}.{p}") if base else (lambda p: p)
    layers = model.get_submodule(join(layout.layers))
    out: dict[str, list[str]] = {"embeddings": [join(p) for p in layout.embeddings], "linears": [], "attention": []}
    for i in range(len(layers)):
        out["linears"] += [join(f"{layout.layers}.{i}.{p}") for p in layout.linears]
        out["attention"].append(join(f"{layout.layers}.{i}.{layout.attention}"))
    for p in layout.head:
        path = p.format(base=base).lstrip(".")
        if _has_linear(model, path):
            out["linears"].append(path)
    return out


def _has_linear(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters BERT's recipe exempts from weight decay: every bias and the parameters
    of every ``nn.LayerNorm`` (found by type: BERT's ``LayerNorm``, DistilBERT's ``sa_layer_norm``...)."""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            if p_name == "bias" or isinstance(module, nn.LayerNorm):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names
