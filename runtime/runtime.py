"""The runtime: load an export, then generate, stream or chat with early exits.

`Runtime` is the segment chain (runtime/chain.py: steps, flushes, KV policies) plus what a
caller needs around it: the export folder checked and opened on a backend, the tokenizer,
thresholds by name or target, the chat template, and the KV cache kept between calls.
One generation, from prompt to records (exact mode included), is runtime/generation.py.

Greedy by default: the graph's own top token. Sampling reads each head's top-k logits (every
export has them; `--with-logits` exports the full vocabulary), see runtime/sampling.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import generation
from .backends import Backend, open_backend
from .chain import Chain
from .chat import ChatTemplate, ChatTemplateError, special_tokens
from .kv_cache import POLICIES
from .manifest import Manifest, ManifestError, from_json_thresholds
from .prefix_cache import KeptSequence
from .results import GenerationResult, Stream
from .verify import verify_files

Thresholds = list[float | None] | float | str | None


class Runtime(Chain):
    def __init__(self, folder: Path, manifest: Manifest, backends: list[Backend], tokenizer, kv_policy: str,
                 head_backends: list[Backend] = (), fill_backends: list[Backend | None] = (),
                 max_pending: int | None = None):
        super().__init__(manifest, backends, kv_policy, head_backends, fill_backends, max_pending)
        self.folder = folder
        self.tokenizer = tokenizer
        self.thresholds = manifest.calibration.thresholds
        self.kept: KeptSequence | None = None  # the last sequence's KV cache, for reuse_cache / chat
        self._chat_template: ChatTemplate | None = None  # read from the export on first use

    @classmethod
    def load(cls, folder: str | Path, *, providers: list[str] | str | None = None, kv_policy: str = "defer",
             threads: int | None = None, verify: bool = True, thread_pool: str = "session",
             chat_template: str | Path | None = None, max_pending: int | None = None) -> "Runtime":
        """Validate the export folder (manifest version, files, checksums) and open one session per segment.

        kv_policy: "defer" (exact caches, work postponed) or "fill" (skipped layers get only
        their keys/values, computed from the exited state). max_pending: bound on deferred
        positions, all segments together (default: the export's, else DEFAULT_MAX_PENDING).
        thread_pool: "session" (a pool per session whose threads sleep between calls) or "shared"
        (CPU: one spinning onnxruntime pool for every session of the process, sized once by
        `threads`: 1.05-1.09x for SmolLM2's int4 chain on idle cores, slower on busy ones; and
        onnxruntime then refuses any session in this process that asks for a pool of its own,
        so it is for processes that run only the chain)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"export folder not found: {folder}")
        manifest = Manifest.load(folder)
        verify_files(folder, manifest, checksums=verify)
        if kv_policy not in POLICIES:
            raise ValueError(f"unknown KV policy {kv_policy!r}; choose one of {POLICIES}")
        wanted = [providers] if isinstance(providers, str) else list(providers or ["CPUExecutionProvider"])
        if manifest.kv_cache.layout == "buffer" and wanted != ["CPUExecutionProvider"]:
            raise ManifestError(f"this export uses the KV buffer layout (onnxruntime's GroupQueryAttention on "
                                f"buffers bound in host memory), which runs on the CPU provider only here, not "
                                f"on {wanted}; export with --kv concat for GPUs and TensorRT")
        backends = [open_backend(folder, s, providers, threads, thread_pool) for s in manifest.segments]
        heads = [open_backend(folder, h, providers, threads, thread_pool) for h in manifest.heads]
        fills = [None] * len(manifest.segments)
        if kv_policy == "fill":
            missing = [sg.index for sg in manifest.segments[1:] if sg.kv_fill is None]
            if missing:
                raise ManifestError(f"{folder}: the fill policy needs K/V fill graphs, which segments {missing} lack "
                                    f"(exported before they existed): re-export, or use kv_policy='defer'")
            fills = [None] + [open_backend(folder, sg.kv_fill, providers, threads, thread_pool) for sg in manifest.segments[1:]]
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        rt = cls(folder, manifest, backends, tokenizer, kv_policy, heads, fills, max_pending)
        if chat_template is not None:  # a file that replaces (or supplies) the export's template
            rt.chat_template = ChatTemplate.from_file(chat_template, special_tokens(folder))
        return rt

    # -- thresholds ----------------------------------------------------------------------
    def resolve_thresholds(self, thresholds: Thresholds) -> list[float]:
        """None: the calibrated default; "never": the full model; a float: that target's
        thresholds from the manifest; a list: one per exit (None = never)."""
        n = len(self.manifest.exits)
        if thresholds is None:
            values = list(self.thresholds)
        elif isinstance(thresholds, str):
            if thresholds != "never":
                raise ValueError(f"thresholds must be None, 'never', a target or a list, got {thresholds!r}")
            values = [None] * n
        elif isinstance(thresholds, (int, float)):
            values = self.manifest.thresholds_for(float(thresholds))
        else:
            values = list(thresholds)
        if len(values) != n:
            raise ValueError(f"{len(values)} thresholds given for {n} exits")
        return from_json_thresholds(values)

    # -- generation ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | np.ndarray, add_special_tokens: bool = True) -> np.ndarray:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        return np.asarray(ids, dtype=np.int64)

    def stream(self, prompt: str | list[int] | np.ndarray, max_new_tokens: int = 32, **options) -> Stream:
        """Generate token by token: yields one TokenRecord per new token (its text piece, exit,
        confidence, time); the last one says why generation stopped (`record.stop`).

        Keyword options: `thresholds` (see resolve_thresholds); sampling, as in SamplingParams:
        temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty, seed;
        stopping: every EOS id of the model (unless stop_at_eos=False), `stop` strings (the text
        is cut before them), `max_time` seconds, a `cancel` threading.Event (closing the iterator
        stops too); `reuse_cache=True` pre-fills only what the previous call's cache lacks.
        After (or instead of) iterating, `stream.result()` gives the GenerationResult."""
        return generation.start(self, prompt, max_new_tokens, options)

    def generate(self, prompt: str | list[int] | np.ndarray, max_new_tokens: int = 32, **options) -> GenerationResult:
        """The continuation of `prompt` as one GenerationResult (same options as `stream`)."""
        return generation.start(self, prompt, max_new_tokens, options).result()

    # -- chat ------------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        """The model's own chat template, from the export (or set one: rt.chat_template = ...)."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_folder(self.folder, self.manifest.tokenizer.chat_template)
            if self._chat_template is None:
                raise ChatTemplateError(
                    f"{self.folder} has no chat template (the model was exported without one): use generate() "
                    f"with a plain prompt, or give a template (Runtime.load(..., chat_template=FILE), "
                    f"`lama chat --chat-template FILE`)")
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: ChatTemplate | None) -> None:
        self._chat_template = template

    def chat_ids(self, messages, add_generation_prompt: bool = True, **variables) -> np.ndarray:
        """The conversation rendered with the chat template and tokenized (no special tokens
        added: the template wrote them), as transformers' apply_chat_template(tokenize=True)."""
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False)

    def chat_stream(self, messages, max_new_tokens: int = 256, **options) -> Stream:
        """Stream the assistant's reply to `messages`. The KV cache of the conversation is kept
        between calls: a new turn pre-fills only the tokens the cache does not hold yet."""
        options.setdefault("reuse_cache", True)
        return self.stream(self.chat_ids(messages), max_new_tokens, **options)

    def chat(self, messages, max_new_tokens: int = 256, **options) -> GenerationResult:
        """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...]) as a
        GenerationResult; `result.cached_tokens` says how much of the prompt the kept cache held."""
        options.setdefault("reuse_cache", True)
        return self.generate(self.chat_ids(messages), max_new_tokens, **options)

    def reset(self) -> None:
        """Forget the kept KV cache (the next call pre-fills its whole prompt)."""
        self.kept = None
