"""BERT-of-Theseus: compressing a fine-tuned BERT by progressive module replacing (Xu et al., EMNLP 2020,
arXiv 2002.02925; reference code ``JetRunner/BERT-of-Theseus``; METHODS.md section 4).

The predecessor (the fine-tuned teacher, L layers) is cut into n modules of L / n consecutive layers; module i
gets a one-layer successor initialised from the predecessor's layer i (its first n layers, as the paper found
best). In each training batch every module is replaced by its successor with probability p, one Bernoulli draw
per module per batch, with p following the curriculum ``p = min(1, k t + b)`` (t the training step) or a
constant rate. The loss is the task loss only. The predecessor's layers, embeddings, pooler and classifier are
frozen (the reference code's optimizer holds only the successor layers); once p reaches 1 training goes on with
the successor alone (the paper's successor fine-tuning). In eval mode the successor runs alone, so evaluation
is of the successor model; :func:`successor_model` cuts it out as a plain n-layer Hugging Face classifier.

The surgery (:func:`theseus_`) swaps ``model.base_model.encoder`` for :class:`TheseusEncoder`, which keeps the
encoder's call signature, so embeddings, attention masks and the head stay Hugging Face's own code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdlsq_pl.errors import ConfigError


def replacing_rate(step: int, k: float, b: float, constant: float | None = None) -> float:
    """The replacing probability at training step ``step`` (0-based): ``constant`` when given, else the
    curriculum ``min(1, k * step + b)`` (paper Eq. 5)."""
    if constant is not None:
        return float(constant)
    return min(1.0, k * step + b)


class TheseusEncoder(nn.Module):
    """A BERT encoder whose modules are replaced by their successors with probability p during training.

    Args:
        encoder: the predecessor's encoder (``BertEncoder``: ``.layer`` a ModuleList of L layers); its layers are
            kept, frozen, as ``predecessor``.
        successor_layers: n, dividing L.
        k, b: the curriculum ``p = min(1, k t + b)``; ``constant``: a constant p instead.

    Forward: ``hidden_states`` ``[B, T, D]`` and the extended attention mask, as ``BertEncoder.forward``;
    returns ``BaseModelOutputWithPastAndCrossAttentions`` with ``last_hidden_state`` ``[B, T, D]``.

    Raises:
        ConfigError: n not in 1..L or not dividing L.
    """

    def __init__(self, encoder: nn.Module, successor_layers: int, k: float, b: float, constant: float | None = None):
        super().__init__()
        L, n = len(encoder.layer), int(successor_layers)
        if not 1 <= n <= L or L % n:
            raise ConfigError(f"method.theseus.successor_layers={n} does not divide the predecessor's {L} layers; "
                              f"allowed: {', '.join(str(d) for d in range(1, L + 1) if L % d == 0)}")
        self.config = encoder.config
        self.encoder_class = type(encoder)  # BertEncoder, RobertaEncoder: rebuilt by successor_model
        self.predecessor = encoder.layer
        for p in self.predecessor.parameters():
            p.requires_grad_(False)
        self.successor = nn.ModuleList(copy.deepcopy(encoder.layer[i]) for i in range(n))
        for p in self.successor.parameters():
            p.requires_grad_(True)
        self.group = L // n
        self.k, self.b, self.constant = float(k), float(b), constant
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # saved with checkpoints: resumes its curriculum
        self.last_replaced: list[bool] = []

    @property
    def rate(self) -> float:
        """The replacing probability of the next training batch."""
        return replacing_rate(int(self.step), self.k, self.b, self.constant)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        kwargs.pop("use_cache", None)
        n = len(self.successor)
        if self.training:
            replaced = (torch.rand(n) < self.rate).tolist()  # one draw per module per batch (the global generator)
            self.step += 1
        else:
            replaced = [True] * n
        self.last_replaced = replaced
        for i, use_successor in enumerate(replaced):
            layers = [self.successor[i]] if use_successor else self.predecessor[i * self.group:(i + 1) * self.group]
            for layer in layers:
                hidden_states = layer(hidden_states, attention_mask, *args, **kwargs)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states)


def theseus_(model: nn.Module, successor_layers: int, k: float, b: float, constant: float | None = None) -> TheseusEncoder:
    """Put a :class:`TheseusEncoder` in place of ``model.base_model.encoder`` and freeze everything but the
    successor layers (embeddings, pooler, classifier and the predecessor's layers stay as trained). Returns it."""
    for p in model.parameters():
        p.requires_grad_(False)
    base = model.base_model
    if not isinstance(getattr(getattr(base, "encoder", None), "layer", None), nn.ModuleList):
        raise ConfigError(f"method=theseus: model type {model.config.model_type!r} has no encoder.layer list; allowed: bert, roberta")
    enc = TheseusEncoder(base.encoder, successor_layers, k, b, constant)
    base.encoder = enc
    return enc


def successor_model(model: nn.Module) -> nn.Module:
    """The successor alone as a plain Hugging Face classifier of n layers (a deep copy; ``model`` is unchanged):
    the predecessor's embeddings, pooler and classifier and the successor layers, ``config.num_hidden_layers = n``.
    Its logits equal ``model``'s in eval mode."""
    enc = model.base_model.encoder
    if not isinstance(enc, TheseusEncoder):
        raise TypeError("successor_model: the model has no TheseusEncoder; allowed: a model after theseus_()")
    out = copy.deepcopy(model)
    base, theseus = out.base_model, out.base_model.encoder
    out.config.num_hidden_layers = len(theseus.successor)
    encoder = theseus.encoder_class(out.config)
    encoder.layer = theseus.successor
    base.encoder = encoder
    for p in out.parameters():
        p.requires_grad_(True)
    return out
