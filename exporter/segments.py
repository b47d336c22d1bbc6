"""Split the early-exit model into segments, one per exit point, as exportable modules.

Segment i runs decoder layers [a_i, b_i) on the positions it is given, with its own KV
cache in and out, then its exit head on the *last* position only (the runtime decides
per token; the head on every position would multiply its cost by the sequence length).
The last segment is the exception: it also outputs the full model's token at every
position it runs (`tokens_all`), which exact mode compares with the tokens that left early
(free at one position; at prefill it adds the LM head on every prompt position).
The head's top-1 token and confidence are computed in the graph, so the runtime reads two
small numbers per segment instead of a vocabulary of logits; the head's TOPK largest logits
(values + ids) come out too, so the runtime can sample on any export (full logits only with
`with_logits`). Segment 0 also embeds the
tokens; the last segment ends with the model's own norm + LM head.

Two KV layouts (`kv=`): "concat" takes past K/V and returns present = concat(past, new),
so the runtime's cache is copied every token; "buffer" runs attention through
onnxruntime's GroupQueryAttention on a preallocated buffer (B, kv_heads, capacity, head_dim)
that the runtime binds as both past and present (see gqa.py), with two extra inputs,
`seqlens_k` (B,) = total length - 1 and `total_sequence_length` (scalar), both int32.

Tensor names are defined once here (`io_specs`) and recorded in the manifest by role.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime import roles as R
from runtime.manifest import KV_LAYOUTS, TensorSpec

from .backbone import Backbone
from .families import LayerCache
from .heads import ExitHeads, confidence


TOPK = 64  # logits every head outputs for sampling; recorded in the manifest as topk_values' shape


def topk_outputs(logits: torch.Tensor, vocab: int) -> list[torch.Tensor]:
    """The TOPK largest logits and their ids. `vocab` is a Python int: a traced logits.shape[-1]
    compared with TOPK would bake the comparison into the graph (and raise a TracerWarning)."""
    values, indices = torch.topk(logits.float(), min(TOPK, vocab), dim=-1)
    return [values, indices]


def segment_bounds(exits: list[int], num_layers: int) -> list[tuple[int, int]]:
    edges = [0] + list(exits) + [num_layers]
    return list(zip(edges[:-1], edges[1:]))


class Segment(nn.Module):
    def __init__(self, backbone: Backbone, heads: ExitHeads | None, index: int, layers: tuple[int, int],
                 confidence_kind: str = "top1", with_logits: bool = False, gates=None, kv: str = "concat",
                 capacity: int | None = None):
        super().__init__()
        if kv not in KV_LAYOUTS:
            raise ValueError(f"unknown KV layout {kv!r}; choose one of {KV_LAYOUTS}")
        self.kv = kv
        if kv == "buffer":
            backbone.family.check_kv_buffer()
            if not capacity or capacity < 1:
                raise ValueError("--kv buffer needs a positive capacity (the longest context the buffer holds)")
            dtype = next(backbone.model.parameters()).dtype
            cos, sin = backbone.family.rope_cache(capacity)
            # graph constants: GroupQueryAttention rotates q/k itself at positions T-S .. T-1
            self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
            self.register_buffer("rope_sin", sin.to(dtype), persistent=False)
        self.family = backbone.family
        self.vocab = backbone.shape.vocab_size
        self.first, self.end = layers
        self.index = index
        self.is_first = index == 0
        self.is_last = heads is None or index == len(heads.exits)
        self.heads = heads
        self.confidence_kind = confidence_kind
        self.with_logits = with_logits
        # gate mode: the graph outputs the gate score and the head's input; the head runs on demand
        self.gated = confidence_kind == "gate" and not self.is_last
        if self.gated and gates is None:
            raise ValueError("confidence 'gate' needs the checkpoint's trained gates")
        self.gates = gates
        # register the layers so .half()/.to() reach them; forward still goes through the family adapter
        self.layers = nn.ModuleList(backbone.family.layers[i] for i in range(self.first, self.end))

    def forward(self, x, attention_mask, position_ids, *rest):
        # x: input_ids (B, S) for segment 0, else hidden (B, S, D)
        # rest: concat layout: past K/V per layer; buffer layout: seqlens_k, total_sequence_length, then buffers
        hidden = self.family.embed(x, position_ids) if self.is_first else x
        entry = hidden[:, -1, :]  # the previous exit's state (or the embeddings): the gate's 'move' feature
        if self.kv == "buffer":
            hidden, presents = self._layers_buffer(hidden, *rest)
        else:
            hidden, presents = self._layers_concat(hidden, attention_mask, position_ids, rest)
        last = hidden[:, -1, :]  # (B, D): the head only runs where the runtime needs a decision
        if self.gated:
            z = self.heads.vocab_input(self.index, last) if "shortlist" in self.gates.features else None
            outs = [self.gates(self.index, last, entry, position_ids[:, -1], z),
                    self.heads.head_input(self.index, last)]
        else:
            if self.is_last:
                logits_all = self.family.logits(hidden)  # (B, S, V)
                tokens_all = logits_all.argmax(-1)  # (B, S): checks the tokens deferred positions emitted early
                logits = logits_all[:, -1, :]
                # every position's top-k: exact sampling draws from the full model at each drafted position
                values_all, indices_all = topk_outputs(logits_all, self.vocab)  # (B, S, k)
                topk = [values_all[:, -1], indices_all[:, -1]]
            else:
                logits = self.heads.logits(self.index, last)
                topk = topk_outputs(logits, self.vocab)
            # the last segment has no gate: its confidence is never compared with a threshold
            token, conf = confidence(logits, "top1" if self.confidence_kind == "gate" else self.confidence_kind)
            outs = [token, conf.float(), *topk]
            if self.with_logits:
                outs.append(logits.float())
        if self.is_last:
            outs += [tokens_all, values_all, indices_all] + ([logits_all.float()] if self.with_logits else [])
        else:
            outs.append(hidden)
        for k, v in presents:
            outs += [k, v]
        return tuple(outs)

    def _layers_concat(self, hidden, attention_mask, position_ids, past_flat):
        dtype = self.layers[0].parameters().__next__().dtype
        mask = self.family.attention_masks(attention_mask, hidden.shape[1], dtype)  # per layer type
        pos_emb = self.family.position_embeddings(hidden, position_ids)
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        cache = LayerCache(self.first, past)
        for i in range(self.first, self.end):
            hidden = self.family.run_layer(i, hidden, mask, position_ids, pos_emb, cache)
        return hidden, cache.presents()

    def _layers_buffer(self, hidden, seqlens_k, total, *buffers):
        presents, pending = [], None
        for n, i in enumerate(range(self.first, self.end)):
            hidden, kv, pending = self.family.run_layer_buffer(i, hidden, (buffers[2 * n], buffers[2 * n + 1]),
                                                               seqlens_k, total, (self.rope_cos, self.rope_sin),
                                                               pending)
            presents.append(kv)
        # the last layer's MLP output: added here, since the next norm is in another graph (or a head)
        return (hidden if pending is None else hidden + pending), presents


def io_specs(seg: Segment, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a segment graph, in the positional order of Segment.forward."""
    D = seg.family.shape().hidden_size
    shape = seg.family.shape()
    if seg.kv == "buffer":  # past and present are one buffer: same shape
        kv = kv_out = ("batch", shape.num_kv_heads, "capacity", shape.head_dim)
    else:
        kv = ("batch", shape.num_kv_heads, "past", shape.head_dim)
        kv_out = ("batch", shape.num_kv_heads, "total", shape.head_dim)
    inputs = [TensorSpec(R.INPUT_IDS, R.INPUT_IDS, "int64", ("batch", "sequence")) if seg.is_first
              else TensorSpec(R.HIDDEN, R.HIDDEN, dtype, ("batch", "sequence", D)),
              TensorSpec(R.ATTENTION_MASK, R.ATTENTION_MASK, "int64", ("batch", "total")),
              TensorSpec(R.POSITION_IDS, R.POSITION_IDS, "int64", ("batch", "sequence"))]
    if seg.kv == "buffer":
        inputs += [TensorSpec(R.SEQLENS_K, R.SEQLENS_K, "int32", ("batch",)),
                   TensorSpec(R.TOTAL_SEQUENCE_LENGTH, R.TOTAL_SEQUENCE_LENGTH, "int32", ())]
    for layer in range(seg.first, seg.end):
        inputs += [TensorSpec(R.PAST_KEY, R.layer_name(R.PAST_KEY, layer), dtype, kv, layer),
                   TensorSpec(R.PAST_VALUE, R.layer_name(R.PAST_VALUE, layer), dtype, kv, layer)]
    if seg.gated:
        outputs = [TensorSpec(R.CONFIDENCE, R.CONFIDENCE, "float32", ("batch",)),
                   TensorSpec(R.EXIT_HIDDEN, R.EXIT_HIDDEN, dtype, ("batch", D))]
    else:
        outputs = head_outputs(shape.vocab_size, seg.with_logits)
    if seg.is_last:  # the full model at every position the call ran: exact mode's checks
        k = min(TOPK, shape.vocab_size)
        outputs += [TensorSpec(R.TOKENS_ALL, R.TOKENS_ALL, "int64", ("batch", "sequence")),
                    TensorSpec(R.TOPK_VALUES_ALL, R.TOPK_VALUES_ALL, "float32", ("batch", "sequence", k)),
                    TensorSpec(R.TOPK_INDICES_ALL, R.TOPK_INDICES_ALL, "int64", ("batch", "sequence", k))]
        if seg.with_logits:
            outputs.append(TensorSpec(R.LOGITS_ALL, R.LOGITS_ALL, "float32", ("batch", "sequence", shape.vocab_size)))
    else:
        outputs.append(TensorSpec(R.HIDDEN_OUT, R.HIDDEN_OUT, dtype, ("batch", "sequence", D)))
    for layer in range(seg.first, seg.end):
        outputs += [TensorSpec(R.PRESENT_KEY, R.layer_name(R.PRESENT_KEY, layer), dtype, kv_out, layer),
                    TensorSpec(R.PRESENT_VALUE, R.layer_name(R.PRESENT_VALUE, layer), dtype, kv_out, layer)]
    return inputs, outputs


def head_outputs(vocab: int, with_logits: bool) -> list[TensorSpec]:
    outs = [TensorSpec(R.TOKEN, R.TOKEN, "int64", ("batch",)),
            TensorSpec(R.CONFIDENCE, R.CONFIDENCE, "float32", ("batch",)),
            TensorSpec(R.TOPK_VALUES, R.TOPK_VALUES, "float32", ("batch", min(TOPK, vocab))),
            TensorSpec(R.TOPK_INDICES, R.TOPK_INDICES, "int64", ("batch", min(TOPK, vocab)))]
    if with_logits:
        outs.append(TensorSpec(R.LOGITS, R.LOGITS, "float32", ("batch", vocab)))
    return outs


class HeadGraph(nn.Module):
    """An exit head on its own, run only for the token that leaves (gate mode).

    Adapter heads share one graph: the segment already applied the tiny adapter, so what is
    left is the model's own norm + LM head, one copy for all exits. Full heads get one graph
    each.
    """

    def __init__(self, heads: ExitHeads, index: int | None, vocab: int, with_logits: bool = False):
        super().__init__()
        self.heads = heads
        self.vocab = vocab
        self.index = index
        self.with_logits = with_logits

    def forward(self, exit_hidden):
        logits = self.heads.head_output(self.index, exit_hidden)
        token, conf = confidence(logits, "top1")
        outs = (token, conf.float(), *topk_outputs(logits, self.vocab))
        return (*outs, logits.float()) if self.with_logits else outs

    def io_specs(self, dtype: str, hidden_size: int, vocab: int):
        return ([TensorSpec(R.EXIT_HIDDEN, R.EXIT_HIDDEN, dtype, ("batch", hidden_size))],
                head_outputs(vocab, self.with_logits))


class KVFill(nn.Module):
    """The fill policy's graph for the exit before segment j: keys and values of layers
    [first, end) (segment j's first layer to the last) computed from the exited hidden state
    (each layer's norm + K/V projections + rotary), never attention or MLP. One call fills
    every skipped layer; the weights it carries are the K/V projections only."""

    def __init__(self, backbone: Backbone, layers: tuple[int, int]):
        super().__init__()
        self.family = backbone.family
        self.first, self.end = layers
        self.layers = nn.ModuleList(backbone.family.layers[i] for i in range(self.first, self.end))

    def forward(self, hidden, position_ids):
        outs = []
        for i in range(self.first, self.end):
            outs += list(self.family.kv_projection(i, hidden, position_ids))
        return tuple(outs)

    def io_specs(self, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        shape = self.family.shape()
        kv = ("batch", shape.num_kv_heads, "sequence", shape.head_dim)
        inputs = [TensorSpec(R.HIDDEN, R.HIDDEN, dtype, ("batch", "sequence", shape.hidden_size)),
                  TensorSpec(R.POSITION_IDS, R.POSITION_IDS, "int64", ("batch", "sequence"))]
        outputs = []
        for layer in range(self.first, self.end):
            outputs += [TensorSpec(R.FILL_KEY, R.layer_name(R.FILL_KEY, layer), dtype, kv, layer),
                        TensorSpec(R.FILL_VALUE, R.layer_name(R.FILL_VALUE, layer), dtype, kv, layer)]
        return inputs, outputs
