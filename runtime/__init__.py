"""LAMA on-device runtime: run an exported early-exit model with numpy + onnxruntime.

No torch, no transformers. A complete session::

    from runtime import Runtime

    rt = Runtime.load("runs/smollm2-onnx")                  # checks manifest version and files
    result = rt.generate("The old house", max_new_tokens=32)  # calibrated exits, greedy
    print(result.text)
    print(result.summary())          # tokens/s, mean layers computed, exits per layer

    full = rt.generate("The old house", thresholds="never")  # the full model, for comparison
    strict = rt.generate("The old house", thresholds=0.99)   # another calibrated target
    warm = rt.generate("The old house", temperature=0.7, top_p=0.9, stop=["\n\n"])  # sampled
    for record in rt.stream("The old house"):                 # token by token
        print(record.text, end="", flush=True)

    chat = [{"role": "user", "content": "Hello!"}]             # the export's own chat template
    reply = rt.chat(chat)                                     # the KV cache is kept for the next turn

On a device the same is on the command line: `lama generate`, `lama chat`, `lama inspect`.
What the runtime refuses raises a `LamaError`: `ManifestError` (the export), `BackendError`
(this device: providers, graphs that do not load), `ChatTemplateError`, `ContextTooLong`
(runtime/errors.py).
"""

from .errors import BackendError, LamaError, ManifestError
from .manifest import Manifest, SCHEMA_VERSION
from .chat import ChatTemplate, ChatTemplateError
from .kv_buffer import ContextTooLong
from .results import GenerationResult, Stream, TokenRecord
from .runtime import Runtime
from .sampling import SamplingParams

__all__ = ["Runtime", "Manifest", "GenerationResult", "Stream", "TokenRecord", "SCHEMA_VERSION",
           "ChatTemplate", "SamplingParams",
           # errors (runtime/errors.py): LamaError is the base of the others
           "LamaError", "ManifestError", "BackendError", "ChatTemplateError", "ContextTooLong"]
