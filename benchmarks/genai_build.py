"""onnxruntime-genai's model builder, run with one compatibility shim (what genai_worker.build runs).

    python -m benchmarks.genai_build ARGS    # exactly `python -m onnxruntime_genai.models.builder ARGS`

Why: transformers 5 stores Gemma 3's rotary settings per attention type,
`rope_parameters = {"full_attention": {"rope_type", "rope_theta"}, "sliding_attention": {...}}`,
and has no `rope_theta` / `rope_local_base_freq` attributes. The builder's `Gemma3Model` still
expects the transformers-4 form: the base `Model.make_rope_init` reads the flat
`rope_parameters["rope_type"]` (KeyError: 'rope_type'), `Model.__init__` takes the global theta from
`config.rope_theta` (silently 10000 when absent, instead of Gemma 3's 1e6), and
`Gemma3Model.__init__` reads `config.rope_local_base_freq` for the sliding layers' cache. The
builder's own `Gemma4Model.make_rope_init` reads the nested form; this does the same for Gemma 3:
after the builder's `make_config_init`, a nested per-type `rope_parameters` is replaced by its
"full_attention" entry, `rope_theta` set from it and `rope_local_base_freq` from the
"sliding_attention" entry. Only plain ("default") RoPE on both types is accepted: with a scaled
global RoPE (Gemma 3 4B and up: linear, factor 8) the builder's Gemma3 path would also scale the
sliding layers' cache, so that raises instead of building a wrong model.

Nothing changes for other models: the patch touches `Gemma3Model` only, acts only on a nested
`rope_parameters`, and skips subclasses that read RoPE themselves (the builder's Gemma4Model).
Written for onnxruntime-genai 0.18.0's builder (onnxruntime_genai/models/builders/gemma.py) with
transformers 5.24; drop it once the builder reads Gemma 3's nested form itself.
"""

from __future__ import annotations

import runpy
import sys

BUILDER = "onnxruntime_genai.models.builder"


def flatten_gemma3_rope(config) -> bool:
    """Turn transformers 5's per-attention-type `rope_parameters` into the transformers-4 form the
    builder's Gemma3Model reads (in place). True when it changed something."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" in rope or "full_attention" not in rope:
        return False
    full = rope["full_attention"]
    sliding = rope.get("sliding_attention", full)
    for kind, params in (("full_attention", full), ("sliding_attention", sliding)):
        if params.get("rope_type", "default") != "default":
            raise NotImplementedError(
                f"genai_build's Gemma 3 shim handles plain RoPE only; {kind} has {params}")
    config.rope_parameters = dict(full)
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = sliding["rope_theta"]
    return True


def patch_builder() -> None:
    """Wrap the builder's Gemma3Model.make_config_init (which Model.__init__ runs first, before
    it reads rope_theta and calls make_rope_init) with `flatten_gemma3_rope`."""
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as `-m` does)
    from builders.base import Model  # the very modules builder.py imports (`from builders import ...`)
    from builders.gemma import Gemma3Model

    original = Gemma3Model.make_config_init
    if getattr(original, "_lama_shim", False):
        return

    def make_config_init(self, config):
        original(self, config)
        if type(self).make_rope_init is Model.make_rope_init:  # not Gemma4Model, which reads the nested form
            flatten_gemma3_rope(config)

    make_config_init._lama_shim = True
    Gemma3Model.make_config_init = make_config_init


def main(argv: list[str]) -> None:
    patch_builder()
    sys.argv = [BUILDER, *argv]
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
