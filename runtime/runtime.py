"""The runtime: load an export, then generate, stream or chat with early exits.

`Runtime` is the segment chain (runtime/chain.py: steps, flushes, KV policies) plus what a
caller needs around it: the export folder checked and opened on a backend, the tokenizer,
thresholds by name or target, the chat template, and the KV cache kept between calls.
One generation, from prompt to records (exact mode included), is runtime/generation.py.

Greedy by default: the graph's own top token. Sampling reads each head's top-k logits (every
export has them; `--with-logits` exports the full vocabulary), see runtime/sampling.py.

Every argument is checked where it enters (`load`, `generate` / `stream` / `chat`, `encode`),
with a message that names it and the values it allows: a bad value never reaches
onnxruntime, numpy, the tokenizer or the template (runtime/validate.py).
"""

from __future__ import annotations

import dataclasses
import os
from numbers import Integral, Real
import warnings
from pathlib import Path

import numpy as np

from . import generation, validate
from .backends import THREAD_POOLS, Backend, open_backend
from .chain import Chain
from .chat import ChatTemplate, ChatTemplateError, special_tokens
from .kv_cache import POLICIES
from .errors import BackendError
from .manifest import Manifest, ManifestError, from_json_thresholds
from .prefix_cache import KeptSequence
from .results import GenerationResult, Stream
from .sampling import SamplingParams
from .stopping import Stopping
from .verify import verify_files

Thresholds = list[float | None] | float | str | None


def _policy_warning(manifest: Manifest, kv_policy: str) -> str | None:
    """Policy.kv_warning for the export's calibration policy (None when it fits, or is unreadable:
    the manifest's own checks already passed, and a warning must never stop a load)."""
    from .policy import Policy

    try:
        policy = Policy.from_dict(manifest.calibration.policy)
    except (TypeError, ValueError, KeyError):
        return None
    return policy.kv_warning(kv_policy)
SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))
FLAG_OPTIONS = ("stop_at_eos", "reuse_cache", "exact")  # True or False, nothing truthy


def _check_path(value, name: str, optional: bool = False) -> None:
    if (value is None and optional) or isinstance(value, (str, os.PathLike)):
        return
    raise TypeError(f"{name} must be a path (str or pathlib.Path){' or None' if optional else ''}, "
                    f"got {value!r} ({type(value).__name__})")


def _check_providers(providers) -> None:
    ok = providers is None or isinstance(providers, str) or (
        isinstance(providers, (list, tuple)) and providers and all(isinstance(p, str) for p in providers))
    if not ok:
        raise TypeError(f"providers must be None (onnxruntime on the CPU), 'tensorrt', or a non-empty list of "
                        f"onnxruntime provider names, got {providers!r}")


def token_ids(prompt, vocab_size: int, name: str = "prompt") -> np.ndarray:
    """A sequence of token ids (list, tuple, 1-D integer array) as int64, each in [0, vocab_size):
    ids outside it would fail inside onnxruntime's Gather, or (negative ones) silently read
    another token's embedding."""
    def outside(i: int, t) -> ValueError:
        return ValueError(f"{name}[{i}] = {t} is not a token id of this model: ids must be in [0, {vocab_size}) "
                          f"(the vocabulary size)")

    if isinstance(prompt, (list, tuple, range)):
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, Integral):
                raise TypeError(f"{name}[{i}] must be an integer token id, got {t!r} ({type(t).__name__})")
            if not 0 <= t < vocab_size:
                raise outside(i, t)
        return np.asarray(prompt, dtype=np.int64)
    if not isinstance(prompt, np.ndarray):
        raise TypeError(f"{name} must be a str or a sequence of token ids (list of int or 1-D integer array), "
                        f"got {type(prompt).__name__}")
    if prompt.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got an array of {prompt.dtype}")
    if prompt.ndim != 1:
        raise ValueError(f"{name} must be one sequence of token ids (1-D), got an array of shape {prompt.shape}")
    bad = np.flatnonzero((prompt < 0) | (prompt >= vocab_size))
    if bad.size:
        raise outside(int(bad[0]), prompt[bad[0]])
    return prompt.astype(np.int64, copy=False)


class Runtime(Chain):
    def __init__(self, folder: Path, manifest: Manifest, backends: list[Backend], tokenizer, kv_policy: str,
                 head_backends: list[Backend] = (), fill_backends: list[Backend | None] = (),
                 max_pending: int | None = None):
        super().__init__(manifest, backends, kv_policy, head_backends, fill_backends, max_pending)
        self.folder = folder
        self.tokenizer = tokenizer
        self.thresholds = manifest.calibration.thresholds
        self.kept: KeptSequence | None = None  # the last sequence's KV cache, for reuse_cache / chat
        # draft sources the export holds beyond prompt lookup (exact decoding), by name
        self.draft_sources: dict = {}
        if manifest.ngram is not None:
            from .drafting import NgramTable

            try:
                self.draft_sources["ngram"] = NgramTable.load(folder / manifest.ngram.file, manifest.model.vocab_size)
            except (OSError, ValueError, KeyError) as e:
                raise ManifestError(f"{folder}: n-gram draft table {manifest.ngram.file} cannot be read: {e}") from None
        self._chat_template: ChatTemplate | None = None  # read from the export on first use

    @classmethod
    def load(cls, folder: str | Path, *, providers: list[str] | str | None = None, kv_policy: str = "defer",
             threads: int | None = None, verify: bool = True, thread_pool: str = "session",
             chat_template: str | Path | None = None, max_pending: int | None = None) -> "Runtime":
        """Validate the export folder (manifest version, files, checksums) and open one session per segment.

        kv_policy: "defer" (exact caches, work postponed) or "fill" (skipped layers get only
        their keys/values, computed from the exited state). max_pending: bound on deferred
        positions, all segments together (default: the export's, else DEFAULT_MAX_PENDING).
        thread_pool: "session" (default: a pool per session whose threads sleep between calls)
        or "shared" (CPU: one spinning onnxruntime pool for every session of the process, sized
        once by `threads`; SmolLM2's int4 chain decodes ~1.4x faster with it on idle cores,
        benchmarks/results/smollm2-135m/full-path-vs-genai/; `lama generate`/`chat` use it).
        Not the default because onnxruntime's pool kind is process-wide: once a shared pool
        exists, onnxruntime refuses any later session in the process that asks for a pool of its
        own (other libraries' sessions too). A process whose sessions already have their own
        pools gets "session" here, with no error. On cores shared with other work spinning
        threads waste them: "session" there."""
        _check_path(folder, "folder")
        _check_providers(providers)
        validate.one_of(kv_policy, "kv_policy", POLICIES)
        validate.integer(threads, "threads", 1, optional=True, meaning="None = onnxruntime's default, one per core")
        validate.boolean(verify, "verify")
        validate.one_of(thread_pool, "thread_pool", THREAD_POOLS)
        _check_path(chat_template, "chat_template", optional=True)
        validate.integer(max_pending, "max_pending", 0, optional=True, meaning="None = the export's bound")
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"export folder not found: {folder}")
        manifest = Manifest.load(folder)
        verify_files(folder, manifest, checksums=verify)
        wanted = [providers] if isinstance(providers, str) else list(providers or ["CPUExecutionProvider"])
        if manifest.kv_cache.layout == "buffer" and wanted != ["CPUExecutionProvider"]:
            raise BackendError(f"this export uses the KV buffer layout (onnxruntime's GroupQueryAttention on "
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
        note = _policy_warning(manifest, kv_policy)
        if note:  # a budget's work was counted for another KV policy than the one that will run
            warnings.warn(note, stacklevel=2)
        if chat_template is not None:  # a file that replaces (or supplies) the export's template
            rt.chat_template = ChatTemplate.from_file(chat_template, special_tokens(folder))
        return rt

    # -- thresholds ----------------------------------------------------------------------
    def resolve_thresholds(self, thresholds: Thresholds) -> list[float]:
        """None: the calibrated default; "never": the full model; a float: that target's
        thresholds from the manifest; a list: one per exit (None = never), each a number (not NaN)."""
        n = len(self.manifest.exits)
        if thresholds is None:
            values = list(self.thresholds)
        elif isinstance(thresholds, str):
            if thresholds != "never":
                raise ValueError(f"thresholds must be None, 'never', a target or a list, got {thresholds!r}")
            values = [None] * n
        elif isinstance(thresholds, Real) and not isinstance(thresholds, bool):
            target = validate.number(thresholds, "thresholds (a target)", 0, 1, low_open=True)
            values = self.manifest.thresholds_for(target)
        elif isinstance(thresholds, (list, tuple, np.ndarray)):
            values = list(np.asarray(thresholds).tolist() if isinstance(thresholds, np.ndarray) else thresholds)
        else:
            raise TypeError(f"thresholds must be None (the calibrated default), 'never', a target in (0, 1] or a "
                            f"list of {n} thresholds, got {thresholds!r} ({type(thresholds).__name__})")
        if len(values) != n:
            raise ValueError(f"{len(values)} thresholds given for {n} exits")
        for i, t in enumerate(values):
            validate.number(t, f"thresholds[{i}]", finite=False, optional=True, meaning="None = never exits")
        return from_json_thresholds(values)

    # -- generation ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | np.ndarray, add_special_tokens: bool = True) -> np.ndarray:
        """The prompt's token ids: a str tokenized, or token ids checked (integers in the vocabulary)."""
        validate.boolean(add_special_tokens, "add_special_tokens")
        vocab = self.manifest.model.vocab_size
        if isinstance(prompt, str):
            if not validate.text(prompt, "prompt"):
                raise ValueError("the prompt is empty")
            ids = token_ids(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids, vocab,
                            "the tokenized prompt")
        else:
            ids = token_ids(prompt, vocab)
        if not ids.size:
            raise ValueError("the prompt is empty (no tokens)")
        return ids

    def _start(self, prompt, max_new_tokens, options: dict) -> Stream:
        """Check the arguments generation reads, then start it: each bad one is named here."""
        validate.integer(max_new_tokens, "max_new_tokens", 0)
        for flag in FLAG_OPTIONS:
            if flag in options:
                validate.boolean(options[flag], flag)
        SamplingParams(**{k: options[k] for k in SAMPLING_OPTIONS if k in options})
        Stopping.build((), options.get("stop"), options.get("max_time"), options.get("cancel"))
        self.resolve_thresholds(options.get("thresholds"))
        return generation.start(self, prompt, int(max_new_tokens), options)

    def stream(self, prompt: str | list[int] | np.ndarray, max_new_tokens: int = 32, **options) -> Stream:
        """Generate token by token: yields one TokenRecord per new token (its text piece, exit,
        confidence, time); the last one says why generation stopped (`record.stop`).

        Keyword options: `thresholds` (see resolve_thresholds); sampling, as in SamplingParams:
        temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty, seed;
        stopping: every EOS id of the model (unless stop_at_eos=False), `stop` strings (the text
        is cut before them), `max_time` seconds, a `cancel` threading.Event (closing the iterator
        stops too); `reuse_cache=True` pre-fills only what the previous call's cache lacks.
        `exact=True` (defer): the full model's output (greedy: its tokens; sampling: its
        distribution, by the speculative-sampling rule); drafted tokens are verified several
        per call (`drafts`: None = every source, "none", a name or a list, see runtime/drafting.py;
        `draft_tokens`: most per call, default 6). `online_check=True` (relaxed mode, defer):
        exited tokens are checked as their deferred layers run, and an exit whose running
        agreement falls below the target is tightened (runtime/online.py; `result.online`).
        After (or instead of) iterating, `stream.result()` gives the GenerationResult."""
        return self._start(prompt, max_new_tokens, options)

    def generate(self, prompt: str | list[int] | np.ndarray, max_new_tokens: int = 32, **options) -> GenerationResult:
        """The continuation of `prompt` as one GenerationResult (same options as `stream`)."""
        return self._start(prompt, max_new_tokens, options).result()

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
        validate.boolean(add_generation_prompt, "add_generation_prompt")
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
