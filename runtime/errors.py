"""The errors the runtime raises for something a user can fix, one class per kind of cause.

    LamaError                  every one of them: `except LamaError` catches them all
    ├── ManifestError          the export: a manifest that is malformed or of a version this runtime
    │                          does not read, a listed file missing or changed, an output or graph an
    │                          asked-for mode needs but the export lacks (exported before it existed)
    ├── BackendError           this device: an execution provider or TensorRT that is not available or
    │                          fell back, a graph onnxruntime cannot load, an engine built for another
    │                          TensorRT version or GPU, a KV layout the chosen provider cannot run
    ├── ChatTemplateError      (runtime/chat.py) no usable chat template, or it refused the conversation
    └── ContextTooLong         (runtime/kv_buffer.py) the context outgrew the export's KV buffers

Each is also a ValueError, as every one of them was before the split, so `except ValueError`
still catches them; code that caught ManifestError for a missing provider or a graph that would
not load (ManifestError covered those too before) catches BackendError, or LamaError, now. Invalid
arguments to a function (a negative max_new_tokens, an unknown KV policy) are plain ValueErrors
(runtime/validate.py): they are the caller's, not the export's or the device's.

Standard library only; runtime/__init__.py exports the classes.
"""

from __future__ import annotations


class LamaError(Exception):
    """Something about an export, this device or a request that LAMA refuses with a message
    saying what to do; the base of the runtime's own errors."""


class ManifestError(LamaError, ValueError):
    """The export folder or its manifest is not something this runtime can run."""


class BackendError(LamaError, ValueError):
    """This device cannot run the export's graphs as asked: the execution provider or TensorRT
    is missing, fell back or refused, or a graph or engine does not load here."""
