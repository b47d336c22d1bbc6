"""One generation, from a prompt to TokenRecords: the options checked before the first
token, the token loop (with exact mode's verification and rollback), text pieces, stop
rules, and the kept KV cache handed back for the next call.

Exact mode (defer, greedy): the last segment's token for every position it runs checks the
tokens that left early; on a mismatch the caches roll back to that position and generation
continues from the full model's token, so the output is the full model's greedy output. A
token is shown once it is final: at once without exact mode, once checked with it.

Exact mode also decodes several tokens per call: when a drafter (runtime/drafting.py) proposes
the next tokens, the step feeds them after the current one through the whole chain; the same
check keeps the longest prefix the full model agrees with, plus the full model's token after
it, and the cache rolls back over the rest. Early-exit tokens are drafts too (checked once
their deferred positions run deep), so every source is verified the same way.

Exact mode with sampling (temperature > 0, or a repetition penalty) gives plain sampling's
output distribution: the full model's (thresholds "never"), with the same SamplingParams.
Every draft is a point mass: a prompt-lookup token, or an exit's argmax (an exit never samples
in exact mode), fixed before the full model's distribution p at its position is known. The
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) for such a draft x is:
accept with probability p(x), else emit a draw from p without x, renormalized, and stop. It is
implemented in its simplest equivalent form: at each checked position draw t ~ p with the
generation's Sampler (filters, and the repetition penalty over the sequence up to there); keep
the draft while t equals it; the first t that differs is emitted and ends the check (`_Draws`,
`accept`). Each emitted token is then one draw from p at its position, in order, from the
generation's one random stream, exactly as in plain sampling: for a seed, exact mode emits
plain sampling's tokens (up to float rounding of the logits between calls), whatever the drafts.
The last segment gives every position's top-k (or full) logits, so one call checks all drafted
positions (runtime/chain.py, `check`); exports made before those outputs check one position
per call there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import roles as R
from .chain import StepStats
from .detokenize import IncrementalDecoder
from .drafting import DraftLengths, make_drafters
from .online import OnlineCheck
from .kv_cache import KVCache
from .manifest import ManifestError
from .prefix_cache import KeptSequence
from .results import GenerationResult, Stream, TokenRecord
from .sampling import SamplingParams, Sampler
from .stopping import Stopping

if TYPE_CHECKING:
    from .runtime import Runtime

# Tokens drafted per step at most. A wrong draft costs its positions in the verifying call (~5%
# of a step each for SmolLM2 on 2 CPU threads), a right one saves a whole step; the cap also
# keeps a call within the export's decode profile (max_pending + 1 positions).
DEFAULT_DRAFT_TOKENS = 6
# What one drafted position costs, as a share of a one-token call: the draft length is chosen
# against it (drafting.DraftLengths). Measured for SmolLM2 on 2 CPU threads (benchmarks/multitoken.py).
DEFAULT_DRAFT_COST = 0.05


@dataclass
class GenerationRun:
    """What one generation needs besides its records, and what `generate` reads back after it."""

    prompt: list[int]
    stopping: Stopping
    sampler: Sampler
    thresholds: list[float]
    cached: int = 0  # prompt tokens the kept cache already held
    exact: bool = False  # verify early tokens with the last segment (defer; greedy or sampled)
    eos: frozenset = frozenset()  # exact mode verifies these before stopping
    stop: str | None = None
    drafters: list = field(default_factory=list)  # exact mode: draft sources, tried in order
    online: OnlineCheck | None = None  # relaxed mode: checks exited tokens as their deferred layers run
    draft_tokens: int = 0  # most tokens drafted per step
    lengths: DraftLengths = field(default_factory=DraftLengths)  # how many of those pay, as drafting goes


@dataclass
class _Token:
    """A token made by a step (or by a rollback: the full model's), not yet shown."""

    token: int
    segment: int  # the segment whose head produced it; the last one = the full model
    exit_layer: int
    confidence: float
    work: StepStats = field(default_factory=StepStats)  # the work of its step (and carried work)
    rollbacks: int = 0
    owed: int = 0  # layer-positions deferred work still needs once it is shown
    source: str = "model"  # "model": a segment's head chose it; else the draft source that proposed it


def start(rt: "Runtime", prompt, max_new_tokens: int, options: dict) -> Stream:
    """Check everything before the first token, so errors surface at the call, not at the
    first next() of a stream."""
    options = dict(options)
    thresholds = options.pop("thresholds", None)
    stop_at_eos = options.pop("stop_at_eos", True)
    stopping = Stopping.build(rt.manifest.tokenizer.eos_ids if stop_at_eos else (), options.pop("stop", None),
                              options.pop("max_time", None), options.pop("cancel", None))
    reuse = bool(options.pop("reuse_cache", False))
    exact = bool(options.pop("exact", False))
    drafts = options.pop("drafts", None)
    draft_tokens = options.pop("draft_tokens", DEFAULT_DRAFT_TOKENS)
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)) or draft_tokens < 0:
        raise ValueError(f"draft_tokens must be an integer >= 0, got {draft_tokens!r}")
    draft_cost = options.pop("draft_cost", DEFAULT_DRAFT_COST)
    if isinstance(draft_cost, bool) or not isinstance(draft_cost, (int, float)) or not 0 <= draft_cost < 10:
        raise ValueError(f"draft_cost (one drafted position's cost, as a share of a one-token call) must be a "
                         f"number in [0, 10), got {draft_cost!r}")
    drafters = make_drafters(drafts, getattr(rt, "draft_sources", None)) if exact else []
    online = options.pop("online_check", False)
    if online is not False and online is not None:
        if exact:
            raise ValueError("online_check is for relaxed mode: exact mode already verifies every token")
        if rt.kv_policy != "defer":
            raise ValueError("online_check needs the 'defer' KV policy (the fill policy never runs skipped layers)")
        if not isinstance(online, OnlineCheck) and online is not True:
            raise TypeError(f"online_check must be True, False or an OnlineCheck, got {online!r}")
    if drafts not in (None, "none", False) and not exact:
        raise ValueError("drafts are verified by the full model in exact mode only: pass exact=True")
    if "stream" in options:
        raise TypeError("generate() always returns a GenerationResult: use Runtime.stream(...) for records")
    try:
        params = SamplingParams(**options)
    except TypeError:
        raise TypeError(f"unknown generation options {sorted(options)}; see Runtime.stream") from None
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = rt.encode(prompt)
    limit = rt.max_context
    if len(ids) >= limit:
        what = "KV buffer capacity" if rt.manifest.kv_cache.layout == "buffer" else "model's context"
        raise ValueError(f"prompt is {len(ids)} tokens; the {what} is {limit}")
    if exact:
        if rt.kv_policy != "defer":
            raise ValueError("exact mode needs the 'defer' KV policy (the fill policy's caches are approximate)")
        if rt.manifest.segments[-1].output(R.TOKENS_ALL) is None:
            raise ManifestError("exact mode needs the last segment's per-position tokens (output 'tokens_all'), "
                                "which this export lacks: re-export it")
    run = GenerationRun(ids.tolist(), stopping, Sampler(params), rt.resolve_thresholds(thresholds), exact=exact,
                        eos=frozenset(rt.manifest.tokenizer.eos_ids if stop_at_eos else ()),
                        drafters=drafters, draft_tokens=min(int(draft_tokens), rt.max_pending),
                        lengths=DraftLengths(float(draft_cost)))
    if online is True:
        online = OnlineCheck.for_manifest(rt.manifest, run.thresholds,
                                          thresholds if isinstance(thresholds, float) else None)
    run.online = online or None
    if run.online is not None:
        run.thresholds = list(run.thresholds)  # tightened in place as the check goes

    def finish(records: list[TokenRecord]) -> GenerationResult:
        text = rt.tokenizer.decode([r.token for r in records])
        if run.stop == "stop":  # cut before the stop string, as the stream did
            text = text[:stopping.stop.find(text)]
        return GenerationResult.from_records(run.prompt, records, text, rt.manifest.model.num_layers,
                                             stop_reason=run.stop, cached_tokens=run.cached,
                                             online=run.online.report() if run.online else None)

    return Stream(_records(rt, ids, max_new_tokens, reuse, run), finish)


class _Draws:
    """Exact mode with sampling: the check the last segment calls at each position it runs
    (Chain.step's `check`). At position pos it draws t from the full model's distribution there,
    with the sampler's filters and the repetition penalty over the sequence up to pos, exactly
    as plain sampling would; made[i] (i = pos + 1 - p) is kept while it equals t. The first
    t that differs replaces it and ends the check (the chain drops the positions after it); a
    draw past the last made token is the step's own new token."""

    def __init__(self, sampler: Sampler, made: list[_Token], history: list[int], p: int):
        self.sampler, self.made, self.history, self.p = sampler, made, history, p
        self.verified = 0  # made[:verified] agreed with the draws so far
        self.rejected: tuple[int, int] | None = None  # (i, the token drawn in place of made[i])
        self.new: int | None = None  # the token drawn after the last made one

    def __call__(self, pos: int, logits: np.ndarray) -> bool:
        i = pos + 1 - self.p
        t = self.sampler.pick(logits, self.history[:self.p + i])
        if i >= len(self.made):
            self.new = t
            return True
        if accept(t, self.made[i].token):
            self.verified = i + 1
            return True
        self.rejected = (i, t)
        return False


def accept(drawn: int, made: int) -> bool:
    """The speculative-sampling rule for a token fixed before the full model's distribution p
    at its position was known (a prompt-lookup draft, an exit's argmax: a point mass): keep it
    when a draw t ~ p equals it, i.e. with probability p(made); on a mismatch t is emitted, which
    is a draw from p without `made`, renormalized (Leviathan et al. 2023; Chen et al. 2023).
    Every emitted token is then a draw from p at its position, as in plain sampling."""
    return drawn == made


def _replace_from(i: int, token: int, made: list[_Token], history: list[int], p: int, cache: KVCache,
                  carry: StepStats, last: int, n_layers: int) -> tuple[np.ndarray, int]:
    """The full model disagreed with made[i]: drop it and what followed (their work goes to
    `carry`; the cache rolls back to position p + i), keep the full model's `token` in its place.
    Returns the next step's input and how many tokens are verified now. A wrong early exit is a
    rollback; a rejected draft is the expected price of drafting."""
    for r in made[i:]:
        carry.add(r.work)
    rollbacks = (made[i].source == "model") + sum(r.rollbacks for r in made[i:])
    del made[i:]
    del history[p + i:]
    cache.truncate(p + i)
    made.append(_Token(token, last, n_layers, float("nan"), rollbacks=rollbacks))
    history.append(token)
    return np.array([token], dtype=np.int64), i + 1


def _tokens(rt: "Runtime", x: np.ndarray, cache: KVCache, n: int, history: list[int],
            run: GenerationRun) -> Iterator[_Token]:
    """Tokens in order, each once final: every token unless run.exact, where an early token
    is final once the last segment has checked it (flushing what waits when generation
    would end). Each carries the work of its step (and of discarded tokens and flushes).

    Exact mode checks a token against the full model's choice at its position: greedy, the
    last segment's `tokens_all` (one call for all positions); sampling, a draw from the full
    model's distribution there (`_Draws`, called by the chain at each checked position, in
    order, up to the first rejected token)."""
    sampler, p, exact = run.sampler, cache.position + len(x), run.exact
    sampled = exact and not sampler.greedy
    last, n_layers = len(rt.manifest.segments) - 1, rt.manifest.model.num_layers
    never = [float("inf")] * len(run.thresholds)  # a drafting step runs the whole chain: it verifies
    made: list[_Token] = []  # one per token so far; token i sits at position p + i
    verified, shown = 0, 0
    carry = StepStats()  # work of discarded tokens and flushes, for the next record
    while True:
        done = len(made) >= n or (made and made[-1].token in run.eos)
        if done and verified == len(made):
            return
        stats, t0 = StepStats(), time.perf_counter()
        draws = _Draws(sampler, made, history, p) if sampled else None
        check = dict(check=draws, check_from=p + verified - 1) if sampled else {}
        if done:  # exact: what is left unverified runs deep now
            rt.flush(cache, stats, **check)
        else:
            source, drafts = _draft(rt, cache, x, history, n - len(made) - 1, run)
            thresholds = run.thresholds if not drafts else never
            if drafts:  # checked below against the full model's tokens at their positions
                stats.drafted[source] = len(drafts)
                first_draft = len(made)
                made += [_Token(d, last, n_layers, float("nan"), source=source) for d in drafts]
                history += drafts
            token, j, conf, logits = rt.step(np.concatenate([x, np.asarray(drafts, dtype=np.int64)]), cache,
                                               thresholds, want_logits=not sampler.greedy and not sampled,
                                               stats=stats, **check)
            stats.steps += 1
            if sampled:  # the exit's argmax (a draft, checked later), else the full model's draw
                wrong = draws.new is not None and j != last and draws.new != token  # a forced flush checked it
                token = token if draws.new is None else draws.new
                if draws.rejected is None:
                    made.append(_Token(token, j, rt.manifest.segments[j].layers[1], conf, rollbacks=int(wrong)))
                    history.append(token)
                    x = np.array([token], dtype=np.int64)
            else:
                if not sampler.greedy:
                    token = sampler.pick(logits[0], history)
                made.append(_Token(token, j, rt.manifest.segments[j].layers[1], conf))
                history.append(token)
                x = np.array([token], dtype=np.int64)
        stats.seconds = time.perf_counter() - t0
        carry.add(stats)
        if sampled:
            if draws.rejected is not None:  # made[i] lost to the full model's draw: the chain dropped what followed
                i, t = draws.rejected
                x, verified = _replace_from(i, t, made, history, p, cache, carry, last, n_layers)
            else:
                verified = max(verified, draws.verified, len(made) if draws.new is not None else 0)
        elif exact:
            for pos in sorted(stats.full_tokens):
                i = pos + 1 - p  # the full model's token for made[i]
                if not 0 <= i < len(made):
                    continue
                full = stats.full_tokens[pos]
                if made[i].token != full:  # roll back to that position, continue from the model's token
                    x, verified = _replace_from(i, full, made, history, p, cache, carry, last, n_layers)
                    break
                verified = max(verified, i + 1)
        else:
            verified = len(made)
            if run.online is not None:  # deferred positions ran deep: were their exited tokens right?
                for pos, full in stats.full_tokens.items():
                    i = pos + 1 - p
                    if 0 <= i < len(made) and made[i].segment != last:
                        run.online.observe(made[i].segment, made[i].token == full, run.thresholds)
        if stats.drafted:  # drafts made[first_draft:...] kept until the first one the full model rejected
            n_drafts = stats.drafted[source]
            run.lengths.update(source, n_drafts, max(0, min(n_drafts, len(made) - 1 - first_draft)))
        if len(made) > shown:  # the newest token not yet shown takes this step's (and carried) work
            made[-1].work.add(carry)
            carry = StepStats()
        owed = rt.owed(cache)
        while shown < verified:
            made[shown].owed = owed
            shown += 1
            yield made[shown - 1]


def _draft(rt: "Runtime", cache: KVCache, x: np.ndarray, history: list[int], wanted: int,
           run: GenerationRun) -> tuple[str, list[int]]:
    """(source, tokens) to feed after x this step: the first drafter that proposes, at most
    `wanted` tokens (those still to make after this step's own), within the context, and
    within one decode call's positions (pending ones included)."""
    room = min(run.draft_tokens, wanted, rt.max_context - cache.position - len(x),
               rt.max_pending - sum(cache.pending_counts()))
    if room <= 0 or not run.drafters:
        return "", []
    for drafter in run.drafters:
        k = run.lengths.choose(drafter.name, room)
        tokens = drafter.propose(history, k) if k else []
        if tokens:
            return drafter.name, tokens[:k]
    return "", []


def _records(rt: "Runtime", ids: np.ndarray, max_new_tokens: int, reuse: bool,
             run: GenerationRun) -> Iterator[TokenRecord]:
    limit = rt.max_context
    run.stopping.start = time.perf_counter()  # max_time counts from the first step, not from the call
    # this generation owns the kept cache until it ends: a second stream started meanwhile
    # finds none and pre-fills from scratch instead of sharing (and corrupting) this one
    kept, rt.kept = rt.kept, None
    reused = kept.reuse_for(ids) if (reuse and kept is not None) else None
    cache, run.cached = reused if reused else (rt.recycle_cache(kept.cache if kept else None), 0)
    if hasattr(cache, "pad"):  # KV buffer: exact decoding runs no one-position call (runtime/kv_buffer.py)
        cache.pad = run.exact
        run.lengths.free = int(run.exact)  # so a first draft rides in the padded position's place
    stopping = run.stopping
    history = ids.tolist()  # the sequence so far: the repetition penalty looks at all of it
    consistent = True
    out_ids: list[int] = []
    try:
        n = min(max_new_tokens, limit - len(ids))
        if n == 0:
            run.stop = "max_new_tokens" if max_new_tokens == 0 else "context"
            return
        detok = IncrementalDecoder(rt.tokenizer)  # complete characters only, linear time
        text, shown = "", 0
        for i, r in enumerate(_tokens(rt, ids[run.cached:], cache, n, history, run)):
            token = r.token
            out_ids.append(token)
            text += detok.add(token)
            limit_reason = None if i < n - 1 else ("max_new_tokens" if n == max_new_tokens else "context")
            run.stop, end = stopping.check(token, text, limit_reason)
            if run.stop and run.stop != "stop":  # the last token: show what is still pending too
                text += detok.flush()
                end = len(text)
            w = r.work
            yield TokenRecord(token, r.segment, r.exit_layer, r.confidence, w.seconds,
                              text[shown:max(shown, end)], run.stop, w.layer_positions, w.fill_positions,
                              w.calls, r.owed, r.rollbacks, r.source, w.steps, dict(w.drafted))
            shown = max(shown, end)
            if run.stop:
                return
    except Exception:  # a failed step left the cache as before it, but this call is over: keep none
        consistent = False
        raise
    finally:  # finished, closed or failed: hand the cache back for the next call to reuse
        final = ids.tolist() + out_ids  # exact mode: the cache may hold unverified positions beyond these
        if consistent and cache.position > len(final):
            cache.truncate(len(final))
        if consistent and cache.position > 0:
            rt.kept = KeptSequence(final, cache)  # holds final[:cache.position]

