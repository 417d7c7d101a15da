"""``lowrank chat`` and ``lowrank generate --chat``: talk to a chat model (a GGUF file, the name
``smollm2``, or a Hugging Face Llama-family directory) through its own chat template
(docs/gguf.md#chat).

    lowrank generate --model smollm2 --chat "What is LoRA?"
    printf 'Hi!\\nAnd what is DoRA?\\n' | lowrank chat --model smollm2 [--adapter DIR]

``generate --chat`` answers one user message; ``chat`` reads one user message per line from
stdin until EOF and keeps the whole conversation in the template, answering each in turn.
Each answer is generated with the KV cache until the model ends its turn (eos or the
template's end-of-turn token) or ``--max-new-tokens``, and printed as it comes, without the
template's markup. ``generate`` of such a model without ``--chat`` continues ``--prompt``.
"""
from __future__ import annotations

import sys

from .. import backend
from ..text.chat_template import ChatTemplate
from ..models.decode import stream
from ..models.llama import Llama
from ..formats.peft_dir import load_pretrained
from ..formats.model_dir import from_pretrained
from ..text.tokenizer import Tokenizer

def wants(args) -> bool:
    """Whether the parsed command is a chat: ``chat``, ``generate --chat``, or ``generate`` of
    a GGUF file / ``smollm2`` (a plain continuation of a Llama-family model)."""
    if args.command == "chat":
        return True
    if args.command != "generate":
        return False
    model = str(args.model)
    return args.chat is not None or model == "smollm2" or model.lower().endswith(".gguf")


def load(model_path, adapter=None, dtype="float32", backend_name=None):
    """``(model, tokenizer)`` of a generating model, with ``adapter`` applied."""
    model = from_pretrained(model_path, dtype, backend_name)
    if not isinstance(model, Llama):
        raise ValueError(f"{model_path} holds a {type(model).__name__}: chat needs a "
                         "Llama-family model (a GGUF file, 'smollm2', or a llama / qwen2 / "
                         "mistral directory)")
    tok = Tokenizer.from_pretrained(model_path)
    if adapter is not None:
        model = load_pretrained(model, adapter)
    return model, tok


class Answerer:
    """Streams answers: decodes the growing reply and writes only what is new (a character
    split across tokens waits for its last byte)."""

    def __init__(self, model, tok, args, out=None):
        self.model, self.tok, self.args = model, tok, args
        self.out = out or sys.stdout
        self.rng = backend.host_rng(args.seed)

    def answer(self, prompt_ids, stop_ids) -> list[int]:
        a, reply, shown = self.args, [], ""
        for token in stream(self.model, [int(i) for i in prompt_ids], a.max_new_tokens,
                            a.temperature, a.top_k, a.top_p, stop_ids, self.rng):
            if token in stop_ids:
                break
            reply.append(token)
            text = self.tok.decode(reply)
            if not text.endswith("\ufffd"):
                self.out.write(text[len(shown):])
                self.out.flush()
                shown = text
        text = self.tok.decode(reply)
        self.out.write(text[len(shown):] + "\n")
        self.out.flush()
        return reply


def run(args) -> int:
    """Answer through the chat template (or continue ``--prompt``); greedy unless a
    temperature is given."""
    args.temperature = 0.0 if args.temperature is None else args.temperature
    if args.backend:
        try:
            backend.set_backend(args.backend)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
    if args.command == "generate" and args.chat is None:   # a plain continuation
        model, tok = load(args.model, args.adapter, args.dtype, args.backend)
        ids = tok.encode(args.prompt).tolist() or [tok.special_id("bos_token") or 0]
        eos = tok.special_id("eos_token")
        Answerer(model, tok, args).answer(ids, [] if eos is None else [eos])
        return 0
    template = ChatTemplate.from_pretrained(args.model)   # before the weights: fail early
    model, tok = load(args.model, args.adapter, args.dtype, args.backend)
    stop_ids = template.stop_ids(tok)
    answerer = Answerer(model, tok, args)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    lines = [args.chat] if args.command == "generate" else _stdin_lines()
    for line in lines:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = template.encode(tok, messages, add_generation_prompt=True)
        reply = answerer.answer(ids, stop_ids)
        messages.append({"role": "assistant", "content": tok.decode(reply)})
    return 0


def _stdin_lines():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


__all__ = ["wants", "run", "load", "Answerer"]
