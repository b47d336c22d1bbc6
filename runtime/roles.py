"""Tensor roles: the names the manifest gives every tensor a graph takes or gives, defined once.

The exporter writes these strings into `manifest.json` (each `TensorSpec.role`) and the runtime
finds every tensor it feeds or reads by them (runtime/manifest.py: `names`, `feeds`,
`per_layer`), so both sides import them from here; no other module in exporter/ or runtime/
spells a role out (tests/test_roles.py checks it). The strings are part of the manifest format:
renaming one breaks every export made before. What each role means, and since which schema
version: docs/manifest.md ("Tensors").

Standard library only, like runtime/manifest.py.
"""

from __future__ import annotations

# -- segment inputs ------------------------------------------------------------------------
INPUT_IDS = "input_ids"  # token ids (first segment)
HIDDEN = "hidden"  # the previous segment's hidden states (also a K/V fill graph's input)
ATTENTION_MASK = "attention_mask"  # concat layout
POSITION_IDS = "position_ids"  # also a K/V fill graph's input
SEQLENS_K = "seqlens_k"  # buffer layout (schema 2): last valid position per row
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # buffer layout (schema 2)
PAST_KEY = "past_key"  # per layer
PAST_VALUE = "past_value"  # per layer
GATE_ON = "gate_on"  # gated segments (opt.): bool scalar, false = the gate's nodes do not run (confidence -inf)

# -- segment outputs -----------------------------------------------------------------------
HIDDEN_OUT = "hidden_out"  # every segment but the last
PRESENT_KEY = "present_key"  # per layer (buffer layout: the same buffer as the past)
PRESENT_VALUE = "present_value"  # per layer
TOKEN = "token"  # the exit's (or the model's) token at the last position
CONFIDENCE = "confidence"  # its score (gate mode: the gate's score)
TOPK_VALUES = "topk_values"  # the head's largest logits at the last position (for sampling)
TOPK_INDICES = "topk_indices"
LOGITS = "logits"  # full logits at the last position (export --with-logits)
EXIT_HIDDEN = "exit_hidden"  # gate mode: the head's input (also the head graph's input)
TOKENS_ALL = "tokens_all"  # last segment (schema 2): the full model's token at every position
TOPK_VALUES_ALL = "topk_values_all"  # last segment (schema 3): top-k at every position
TOPK_INDICES_ALL = "topk_indices_all"
LOGITS_ALL = "logits_all"  # last segment, with --with-logits: logits at every position

# -- K/V fill graphs (the `fill` KV policy) ------------------------------------------------------
FILL_KEY = "fill_key"  # per layer
FILL_VALUE = "fill_value"  # per layer

# -- groups ----------------------------------------------------------------------------------
PAST = (PAST_KEY, PAST_VALUE)  # per-layer inputs, key then value
PRESENT = (PRESENT_KEY, PRESENT_VALUE)  # per-layer outputs, key then value
FILL = (FILL_KEY, FILL_VALUE)  # per-layer fill-graph outputs, key then value
PER_LAYER = (*PAST, *PRESENT, *FILL)  # roles whose TensorSpec carries a layer index

ALL = frozenset({
    INPUT_IDS, HIDDEN, ATTENTION_MASK, POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, PAST_KEY, PAST_VALUE, GATE_ON,
    HIDDEN_OUT, PRESENT_KEY, PRESENT_VALUE, TOKEN, CONFIDENCE, TOPK_VALUES, TOPK_INDICES, LOGITS, EXIT_HIDDEN,
    TOKENS_ALL, TOPK_VALUES_ALL, TOPK_INDICES_ALL, LOGITS_ALL, FILL_KEY, FILL_VALUE,
})  # every role this runtime knows


def layer_name(role: str, layer: int) -> str:
    """The tensor name the exporter gives a per-layer role's tensor: `past_key.3`."""
    return f"{role}.{layer}"
