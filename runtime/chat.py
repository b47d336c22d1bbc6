"""Chat templates rendered on the device, the way transformers renders them, without transformers.

An instruction-tuned model only answers well when its prompt is laid out with its own chat
template (roles, turn markers). The template is a Jinja2 string that travels with the export
(`chat_template.jinja` beside the manifest, which is where transformers >= 4.47 saves it, or the
`chat_template` key of `tokenizer_config.json` in older exports). We render it with the same
Jinja2 environment as transformers' `apply_chat_template` (sandboxed, `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, and the globals and filters templates rely on:
`raise_exception`, `tojson`, `strftime_now`, `dict`, `namespace`, plus the special tokens such as
`bos_token` as variables), so the prompt a device sends is byte for byte the one the model was
tuned on. The rendered text is then tokenized without adding special tokens (the template
already wrote them), as transformers does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import LamaError

TEMPLATE_FILE = "chat_template.jinja"  # where transformers' save_pretrained puts it
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # same aliases as transformers


class ChatTemplateError(LamaError, ValueError):
    """The export has no usable chat template, or the template refused the conversation."""


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
        transformers; for rendering it is transparent, but the tag must parse."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides Jinja's tojson, which would escape HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # dict() for templates without handing them the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore names, which could reach interpreter internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def _plain(value):
    """JSON-like data only: templates are untrusted code and must not see rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    # subclasses (enums, numpy scalars) lose their extra methods
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as transformers passes them to the template: plain dicts, keys with None dropped,
    reasoning copied under the names templates read."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                f"got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("the conversation is empty: give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role' (and usually 'content'), got {m!r}")
        m = {k: v for k, v in _plain(m).items() if v is not None}
        _check_message(m, i)
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _check_message(m: dict, i: int) -> None:
    """A role that is a str, and content that is a str (or a list of content parts, which some
    templates iterate): anything else would fail inside the template with a bare Jinja or
    Python message, or (text with lone surrogates) inside the tokenizer."""
    from . import validate

    where = f"messages[{i}]"
    if not isinstance(m["role"], str):
        raise ChatTemplateError(f"{where}['role'] must be a str such as 'user', got {m['role']!r}")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) for part in content):
            raise ChatTemplateError(f"{where}['content'] as a list must hold content parts (dicts such as "
                                    f"{{'type': 'text', 'text': ...}}), got {content!r}")
    elif content is not None:
        if not isinstance(content, str):
            raise ChatTemplateError(f"{where}['content'] must be a str (or a list of content parts), got "
                                    f"{content!r} ({type(content).__name__})")
        try:
            validate.text(content, f"{where}['content']")
        except ValueError as e:
            raise ChatTemplateError(str(e)) from None


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):  # serialized AddedToken
        return value["content"]
    return None


def special_tokens(config: Mapping | str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, from a tokenizer_config (dict, or the folder holding
    it): transformers hands these to every template."""
    if not isinstance(config, Mapping):
        path = Path(config) / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
    return {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja2 text
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token, ... as strings
    origin: str = ""  # where it was read from, for messages

    @classmethod
    def from_folder(cls, folder: str | Path, file: str | None = None, name: str | None = None) -> "ChatTemplate | None":
        """The template of an export (or any tokenizer folder): `file` if the manifest names one,
        else `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`. None if absent."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        specials = special_tokens(config)
        for candidate in ([file] if file else []) + [TEMPLATE_FILE]:
            path = folder / candidate
            if path.is_file():
                return cls(path.read_text(encoding="utf-8"), specials, str(path))
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            key = name or "default"
            if key not in named:
                raise ChatTemplateError(f"{config_path}: no chat template named {key!r}; have {sorted(named)}")
            source = named[key]
        if isinstance(source, str) and source:
            return cls(source, specials, f"{config_path} (chat_template)")
        return None

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: dict | None = None) -> "ChatTemplate":
        path = Path(path)
        if not path.is_file():
            raise ChatTemplateError(f"chat template file not found: {path}")
        return cls(path.read_text(encoding="utf-8"), dict(special_tokens or {}), str(path))

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, documents: list[dict] | None = None, **variables) -> str:
        """The conversation as the model's prompt text. `variables` reach the template as
        transformers' extra kwargs do (e.g. `enable_thinking=False`) and override special tokens."""
        import jinja2

        template = _compile(self.source)
        context = _plain({**self.special_tokens, **variables})
        messages = normalize_messages(messages)
        try:
            return template.render(messages=messages, tools=_plain(tools),
                                   documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                                   **context)
        except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template lands here too
            raise ChatTemplateError(f"chat template ({self.origin or 'given'}): {e}") from None
        except (TypeError, ValueError) as e:  # e.g. str + list: the template expects other message values
            raise ChatTemplateError(f"chat template ({self.origin or 'given'}) cannot render these messages "
                                    f"({type(e).__name__}: {e}); check that each message's content is what this "
                                    f"template expects (most take a str)") from None
