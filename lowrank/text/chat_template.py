"""Chat templates: the Jinja template a model's files carry, rendered as transformers renders it
(``apply_chat_template``) and tokenised the same way (docs/gguf.md#chat-template).

The template comes from a GGUF file's ``tokenizer.chat_template``, a directory's
``chat_template.jinja``, or its ``tokenizer_config.json`` (``chat_template``). It runs in
Jinja's immutable sandbox (templates are untrusted code) with transformers' settings:
``trim_blocks`` and ``lstrip_blocks``, the loop controls (``break``, ``continue``), the
``{% generation %}`` block (rendered as its body), ``raise_exception(msg)``,
``strftime_now(fmt)``, a ``tojson`` that leaves non-ASCII and HTML characters alone, and the
model's special tokens (``bos_token``, ``eos_token``, ...) as variables. The rendered text is
encoded without adding special tokens: the template writes every one it wants, so none is
added twice.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from ..files.gguf_file import gguf_metadata
from ..files.locate import gguf_file, resolve
from .tokenizer_files import (read_tokenizer_config, special_tokens_of_config,
                              special_tokens_of_metadata)

TEMPLATE_FILE = "chat_template.jinja"
# end-of-turn tokens of the usual templates: generation stops at these as at eos
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: marks the assistant's text for a
        training mask in transformers; here it renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names (no reach into Python's internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template cannot set the namespace attribute {name!r}")

    class Dict:
        """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=Dict(), namespace=Namespace)
    return env.from_string(source)


def _plain(value):
    """Messages as plain JSON data (what the template may see); keys valued None dropped, as
    transformers drops them (templates test for a missing key, not for None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A model's chat template with the special tokens it sees."""

    def __init__(self, source: str, special_tokens: dict | None = None, where: str = "template"):
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{where}: the chat template is empty")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.where = where
        try:
            _compile(source)
        except Exception as exc:   # a syntax error: one line naming the file
            raise ValueError(f"{where}: the chat template does not compile: "
                             f"{' '.join(str(exc).split())}") from None

    def render(self, messages, add_generation_prompt: bool = False, tools=None,
               documents=None, **kwargs) -> str:
        """The conversation as text: ``messages`` a list of ``{"role", "content"}`` dicts;
        ``add_generation_prompt`` opens the assistant's turn."""
        if not isinstance(messages, (list, tuple)) or \
                not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts ({'role': ..., "
                             "'content': ...})")
        context = {**self.special_tokens, **_plain(kwargs)}
        try:
            return _compile(self.source).render(
                messages=_plain(list(messages)), tools=_plain(tools),
                documents=_plain(documents), add_generation_prompt=bool(add_generation_prompt),
                **context)
        except Exception as exc:
            import jinja2
            if not isinstance(exc, jinja2.exceptions.TemplateError):
                raise
            raise ValueError(f"{self.where}: chat template: "
                             f"{' '.join(str(exc).split())}") from None

    def encode(self, tokenizer, messages, add_generation_prompt: bool = False, **kwargs):
        """Token ids (an ``int32`` host array) of the rendered conversation; no special token
        is added beyond those the template writes."""
        return tokenizer.encode(self.render(messages, add_generation_prompt, **kwargs))

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids that end the assistant's turn: eos and the usual end-of-turn tokens that
        this template writes."""
        ids = []
        eos = tokenizer.special_id("eos_token") if hasattr(tokenizer, "special_id") else None
        if eos is not None:
            ids.append(int(eos))
        for token in END_OF_TURN:
            i = tokenizer.token_to_id(token)
            if i is not None and token in self.source and int(i) not in ids:
                ids.append(int(i))
        return ids

    def __repr__(self):
        return f"ChatTemplate({self.where}, {len(self.source)} characters)"

    # --- where templates live -----------------------------------------------------------
    @classmethod
    def from_gguf(cls, path) -> "ChatTemplate":
        """``tokenizer.chat_template`` of a GGUF file, with its special tokens."""
        metadata = gguf_metadata(path)
        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str):
            raise ValueError(f"{path}: metadata field 'tokenizer.chat_template' is missing")
        return cls(source, special_tokens_of_metadata(metadata, path), str(path))

    @classmethod
    def from_directory(cls, directory) -> "ChatTemplate":
        """``chat_template.jinja`` of a Hugging Face directory, else the ``chat_template``
        of its ``tokenizer_config.json`` (a string, or the entry named ``default``)."""
        directory = Path(directory)
        config = read_tokenizer_config(directory)
        special = special_tokens_of_config(config)
        file = directory / TEMPLATE_FILE
        if file.is_file():
            return cls(file.read_text(encoding="utf-8"), special, str(file))
        source = config.get("chat_template")
        if isinstance(source, list):   # named templates
            source = next((t.get("template") for t in source
                           if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise ValueError(f"{directory} has no chat template (neither {TEMPLATE_FILE} nor "
                             "a 'chat_template' in tokenizer_config.json)")
        return cls(source, special, str(directory / "tokenizer_config.json"))

    @classmethod
    def from_pretrained(cls, path) -> "ChatTemplate":
        """The chat template of a GGUF file (a ``.gguf`` path, ``"smollm2"``) or of a model
        directory."""
        file = gguf_file(path)
        return cls.from_gguf(file) if file is not None else cls.from_directory(resolve(path))


__all__ = ["ChatTemplate", "TEMPLATE_FILE", "END_OF_TURN"]
