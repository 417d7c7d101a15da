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

import argparse
import os
import sys

from .. import backend
from ..backend import threads
from ..text.chat_template import ChatTemplate
from ..models.decode import stream
from ..models.llama import Llama
from ..formats.peft_dir import load_pretrained
from ..formats.hf_model import from_pretrained
from ..text.tokenizer import Tokenizer

COMMANDS = ("chat", "generate")


def handles(argv) -> bool:
    """Whether ``argv`` is a chat command: ``chat``, ``generate --chat``, or ``generate`` of a
    GGUF file / ``smollm2`` (the CLI's other commands stay its own)."""
    if not argv or argv[0] not in COMMANDS:
        return False
    if argv[0] == "chat" or any(a == "--chat" or a.startswith("--chat=") for a in argv):
        return True
    for i, a in enumerate(argv):
        model = a.split("=", 1)[1] if a.startswith("--model=") else \
            argv[i + 1] if a == "--model" and i + 1 < len(argv) else None
        if model is not None and (model == "smollm2" or model.lower().endswith(".gguf")):
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description="chat with a model")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("chat", "talk with a chat model: one user message per line of stdin"),
                       ("generate", "answer one message (--chat) or continue --prompt")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--model", required=True,
                       help="a GGUF file, 'smollm2', or a Hugging Face Llama-family directory")
        p.add_argument("--adapter", default=None,
                       help="adapter directory to apply (PEFT's format or lowrank's)")
        if name == "generate":
            p.add_argument("--chat", default=None, metavar="MESSAGE",
                           help="a user message, answered through the chat template")
            p.add_argument("--prompt", default="", help="text to continue (without --chat)")
        p.add_argument("--system", default=None, help="a system message opening the chat")
        p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
        p.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
        p.add_argument("--backend", choices=("numpy", "numpy-strict", "cupy"), default=None)
        p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads")
    return parser


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
    if args.threads is not None:
        threads.set_threads(threads.check_threads(args.threads))
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


def main(argv) -> int:
    """Run a chat command; a failure is one line on stderr (2: bad input, 3: a bug —
    LOWRANK_DEBUG=1 shows its traceback, 130: interrupted, 141: output closed)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if not exc.code:
            raise
        return exc.code
    try:
        return run(args)
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except KeyboardInterrupt:
        print(f"lowrank {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, OSError) as exc:
        print(f"lowrank {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("LOWRANK_DEBUG"):
            raise
        print(f"lowrank {args.command}: internal error: {type(exc).__name__}: "
              f"{' '.join(str(exc).split())} (LOWRANK_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 3


__all__ = ["handles", "main", "load", "Answerer"]
