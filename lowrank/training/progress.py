"""Progress for a person: a tqdm bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns, which in a log file or a pipe become one long
line of junk; so when stderr is not a terminal the same calls print a line at each tenth of
the run (and at its end) instead: ``finetune: step 40/200  loss 3.214  tok_s 5120``.
"""
from __future__ import annotations

import sys

LINES = 10   # lines over a whole run when stderr is not a terminal


def on_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # closed or replaced streams
        return False


class ProgressLines:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, printed as a few plain lines."""

    def __init__(self, total: int, desc: str, initial: int = 0, stream=None):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.postfix = ""
        self.every = max(1, self.total // LINES)

    def set_postfix(self, **values) -> None:
        self.postfix = "  ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            print(f"{self.desc}: step {self.n}/{self.total}  {self.postfix}".rstrip(),
                  file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _Silent(ProgressLines):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0,
                 leave: bool = True):
    """A tqdm bar on a terminal, ``ProgressLines`` elsewhere, nothing when not ``enabled``."""
    if not enabled:
        return _Silent(total, desc, initial)
    if not on_terminal():
        return ProgressLines(total, desc, initial)
    from tqdm import tqdm   # only a terminal needs it
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=leave)
