"""LAMA on-device runtime: run an exported early-exit model with numpy + onnxruntime.

No torch, no transformers. A complete session::

    from runtime import Runtime

    rt = Runtime.load("runs/smollm2-onnx")                  # checks manifest version and files
    result = rt.generate("The old house", max_new_tokens=32)  # calibrated exits, greedy
    print(result.text)
    print(result.summary())          # tokens/s, mean layers computed, exits per layer

    full = rt.generate("The old house", thresholds="never")  # the full model, for comparison
    strict = rt.generate("The old house", thresholds=0.99)   # another calibrated target
    for record in rt.generate("The old house", stream=True):  # token by token
        print(record.text, end="", flush=True)
"""

from .manifest import Manifest, ManifestError, SCHEMA_VERSION
from .results import GenerationResult, TokenRecord
from .runtime import Runtime

__all__ = ["Runtime", "Manifest", "ManifestError", "GenerationResult", "TokenRecord", "SCHEMA_VERSION"]
