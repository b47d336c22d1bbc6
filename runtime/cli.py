"""The device commands of `lama` (generate, chat, inspect), with the runtime: numpy,
onnxruntime, tokenizers and jinja2 only, no torch, and no import of the exporter.

The `lama` program (`lama/cli.py`) adds these to the host commands (train, calibrate, export:
`exporter/cli.py`). `python -m runtime.cli ...` runs the device commands alone, as a device
without the `lama` package would. Imports are deferred to each command so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .errors import LamaError


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from .manifest import SCHEMA_VERSION

    try:
        v = dist_version("lama-ee")
    except PackageNotFoundError:
        v = "unknown (not installed)"
    try:
        import onnxruntime

        ort = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort = "onnxruntime missing"
    return f"lama {v} (manifest schema {SCHEMA_VERSION}; {ort}; Python {sys.version.split()[0]})"


# -- device commands -------------------------------------------------------------------------
def _load(a: argparse.Namespace):
    from .runtime import Runtime

    show = sys.stderr.isatty() and not a.json  # loading verifies checksums: seconds for a large export
    note = f"loading {a.model_dir} (checking files) ..."
    if show:
        print(note, end="\r", file=sys.stderr, flush=True)
    rt = Runtime.load(a.model_dir, providers=a.providers, kv_policy=a.kv_policy, threads=a.threads, thread_pool=a.thread_pool,
                      chat_template=a.chat_template, max_pending=a.max_pending)
    if show:
        print(" " * len(note), end="\r", file=sys.stderr, flush=True)
    return rt


def unescape(text: str) -> str:
    """`--stop "\\n\\n"` from a shell arrives as backslashes: read \\n, \\t, \\\\ as Python does
    (non-ASCII text passes through unchanged)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _options(a: argparse.Namespace) -> dict:
    thresholds = "never" if a.full else a.target
    stop = [unescape(s) for s in a.stop] if a.stop else None
    return dict(thresholds=thresholds, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, stop=stop,
                stop_at_eos=not a.ignore_eos, max_time=a.max_time, exact=a.exact,
                **(dict(drafts=a.drafts, draft_tokens=a.draft_tokens, draft_cost=a.draft_cost)
                   if a.exact or a.drafts else {}),
                **(dict(online_check=True) if a.online_check else {}))


def _stats(result) -> str:
    cached = f", {result.cached_tokens} prompt tokens from the kept cache" if result.cached_tokens else ""
    return f"[{result.summary()}; stop: {result.stop_reason}{cached}]"


def _stream(stream, echo: bool):
    """Print the pieces as they come; Ctrl-C stops this generation (not the program)."""
    cancelled = False
    with contextlib.closing(stream):
        try:
            for rec in stream:
                if echo:
                    print(rec.text, end="", flush=True)
        except KeyboardInterrupt:
            cancelled = True
    if echo:
        print()
    result = stream.result()
    if cancelled:
        print("[stopped]", file=sys.stderr)
    return result


def cmd_generate(a: argparse.Namespace) -> None:
    rt = _load(a)
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    opts = _options(a)
    if a.chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": prompt}]
        stream = rt.chat_stream(messages, a.max_new_tokens, **opts)
    else:
        stream = rt.stream(prompt, a.max_new_tokens, **opts)
    result = _stream(stream, echo=not a.json)
    if a.json:
        print(json.dumps(result.to_dict()))
    else:
        print(_stats(result), file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> None:
    rt = _load(a)
    rt.chat_template  # fail now, before the first question, if the export has none
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    interactive = sys.stdin.isatty() and not a.json
    if interactive:
        print("chat with the model: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply",
              file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(system)
            rt.reset()
            continue
        messages.append({"role": "user", "content": line})
        result = _stream(rt.chat_stream(messages, a.max_new_tokens, **_options(a)), echo=not a.json)
        messages.append({"role": "assistant", "content": result.text})
        if a.json:  # one JSON line per turn, for scripts
            print(json.dumps({"role": "assistant", "content": result.text, **{
                k: v for k, v in result.to_dict().items() if k not in ("text", "records")}}), flush=True)
        elif not a.quiet:
            print(_stats(result), file=sys.stderr)


def cmd_inspect(a: argparse.Namespace) -> None:
    from .inspect_export import describe, render

    info = describe(a.model_dir)
    print(json.dumps(info, indent=2) if a.json else render(info))


# -- parser ---------------------------------------------------------------------------------
def _runtime_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model_dir", type=Path, help="an export folder (manifest.json, segment graphs, tokenizer)")
    p.add_argument("--providers", nargs="+", help="onnxruntime providers, or 'tensorrt' for native engines")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: onnxruntime's, one per core)")
    p.add_argument("--thread-pool", choices=["shared", "session"], default=os.environ.get("LAMA_THREAD_POOL", "shared"),
                   help="shared (default, or $LAMA_THREAD_POOL): one spinning onnxruntime pool for all segments (CPU; "
                        "~1.4x on SmolLM2's int4 chain on idle cores); session: one pool per segment whose threads "
                        "sleep between calls (cores shared with other work, or a process with other onnxruntime "
                        "sessions: the pool kind is process-wide)")
    p.add_argument("--kv-policy", choices=["defer", "fill"], default="defer",
                   help="defer: skipped layers run later, caches exact; fill: skipped layers get only K/V "
                        "projections of the exited state (saves their work, approximate)")
    p.add_argument("--max-pending", type=int, help="bound on deferred positions (default: the export's)")
    p.add_argument("--chat-template", type=Path, help="Jinja2 chat template file (default: the export's own)")
    return p


def _generation_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("exits")
    g.add_argument("--target", type=float, help="use the thresholds of another target from the calibration table")
    g.add_argument("--full", action="store_true", help="never exit early (the full model)")
    g.add_argument("--exact", action="store_true", help="verify early tokens with the full model's head (defer): "
                   "the output is the full model's (greedy: its tokens; with --temperature: its sampling "
                   "distribution, and for a --seed plain sampling's tokens); tokens appear once verified. Drafted "
                   "tokens are verified several per call (multi-token decoding)")
    g.add_argument("--drafts", nargs="+", default=None, metavar="SOURCE",
                   help="with --exact: draft sources to use, tried in order (default: every one the export "
                        "holds; 'lookup' = n-gram matches in the prompt and the text so far; 'ngram' = the table "
                        "of what the model itself predicts after each short context, made by lama train; "
                        "'none' = one token per call)")
    g.add_argument("--draft-tokens", type=int, default=6, help="with --exact: most tokens drafted per call")
    g.add_argument("--draft-cost", type=float, default=0.05,
                   help="with --exact: one drafted position's cost as a share of a one-token call on this device "
                        "(sets how long drafts are: benchmarks/multitoken.py measures it; ~0 on a GPU)")
    g.add_argument("--online-check", action="store_true",
                   help="without --exact (defer): check exited tokens against the full model as their deferred "
                        "layers run, and tighten an exit whose running agreement falls below the target")
    s = p.add_argument_group("sampling (default: greedy)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    s.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("stopping")
    t.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string (repeatable; \\n and \\t are understood); cut from the output")
    t.add_argument("--max-time", type=float, help="seconds per generation")
    t.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS ids")
    p.add_argument("--json", action="store_true", help="print JSON for scripts instead of streaming text")
    return p


def add_device_commands(sub) -> None:
    run, gen = _runtime_args(), _generation_args()
    r = sub.add_parser("generate", parents=[run, gen], help="continue a prompt on this device (no torch needed)")
    r.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--chat", action="store_true", help="send the prompt as a user message with the chat template")
    r.add_argument("--system", help="system message (with --chat)")
    r.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[run, gen],
                       help="talk with the model (its chat template; the conversation's KV cache is kept)",
                       description="Interactive on a terminal; otherwise one user message per line of stdin.")
    c.add_argument("--system", help="system message")
    c.add_argument("--max-new-tokens", type=int, default=256, help="per reply")
    c.add_argument("--quiet", action="store_true", help="no statistics after each reply")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("inspect", help="what an export holds: model, segments, exits, thresholds, backends here")
    i.add_argument("model_dir", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    """The device commands alone (`python -m runtime.cli`); `lama/cli.py` adds the host ones."""
    p = argparse.ArgumentParser(prog="lama", description="Run an exported early-exit model on this device.")
    p.add_argument("--version", action="version", version=version())
    add_device_commands(p.add_subparsers(dest="command", required=True))
    return p


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run one command; errors a user can fix print one line and return 2: the
    runtime's own (LamaError: the export, this device's backends, a chat template, a full KV
    buffer; runtime/errors.py) and the host commands' bad arguments, missing or existing files
    and failed runs."""
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (LamaError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:  # one line, no traceback
        print(f"lama {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lama generate ... | head`
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
