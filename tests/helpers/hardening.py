"""What the hardening batteries share (tests/test_hardening_*.py, benchmarks/hardening_battery.py):
a per-outcome tally, a time cap per case, tiny run directories, and the loader worker that runs
under an address-space cap.

Every case ends in one outcome; the batteries assert the failing ones never occur and the tally
is written to ``$HARDENING_REPORT`` (JSON) when that is set, so a long run can report counts.
"""
import atexit
import collections
import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TALLY = collections.defaultdict(collections.Counter)     # battery -> outcome -> count
PEAK_RSS_MB = {}                                          # battery -> the worker's peak
FAILING = {"traceback", "hang", "memory", "wrong", "nan", "unnamed", "multiline", "internal"}
CASE_SECONDS = float(os.environ.get("HARDENING_CASE_SECONDS", 30))
ADDRESS_SPACE = int(os.environ.get("HARDENING_ADDRESS_SPACE", 4 << 30))


def examples(default: int) -> int:
    """Examples per battery: ``$HARDENING_EXAMPLES`` (long runs) or the CI default."""
    return int(os.environ.get("HARDENING_EXAMPLES", default))


def record_peak(battery: str, reply: dict) -> None:
    """Keep the largest ``maxrss_mb`` a worker reported for ``battery``."""
    if "maxrss_mb" in reply:
        PEAK_RSS_MB[battery] = max(PEAK_RSS_MB.get(battery, 0.0), float(reply["maxrss_mb"]))


def record(battery: str, outcome: str, detail: str = "") -> str:
    TALLY[battery][outcome] += 1
    if os.environ.get("HARDENING_LOG"):   # one line per case, for reading the messages
        with open(os.environ["HARDENING_LOG"], "a") as fh:
            fh.write(f"{battery}\t{outcome}\t{' '.join(detail.split())[:400]}\n")
    assert outcome not in FAILING, f"{battery}: {outcome}: {detail}"
    return outcome


@atexit.register
def _report():
    path = os.environ.get("HARDENING_REPORT")
    if path and TALLY:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        for battery, counts in TALLY.items():
            merged = collections.Counter(old.get(battery, {}))
            merged.update(counts)
            old[battery] = dict(merged)
        peaks = old.setdefault("__peak_rss_mb__", {})
        for battery, mb in PEAK_RSS_MB.items():
            peaks[battery] = max(peaks.get(battery, 0.0), round(mb, 1))
        Path(path).write_text(json.dumps(old, indent=1, sort_keys=True))


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_cap(seconds: float = CASE_SECONDS):
    """Raise CaseTimeout in this (main) thread after ``seconds``."""
    def fire(signum, frame):
        raise CaseTimeout(f"case ran past {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


class Worker:
    """``tests/helpers/hardening_worker.py`` in a subprocess under RLIMIT_AS; ``ask`` times a request."""

    def __init__(self):
        self.proc = None

    def start(self):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "hardening_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env,
                                     preexec_fn=_limit_address_space)

    def ask(self, request: dict, seconds: float = CASE_SECONDS) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        line = self.proc.stdout.readline() if ready else ""
        if not ready:
            self.stop()
            return {"outcome": "hang"}
        if not line:   # the process died: a signal, or a BaseException that escaped
            code = self.proc.wait()
            self.proc = None
            return {"outcome": "memory" if code in (-9, -6) else "traceback",
                    "message": f"worker died with exit code {code}"}
        return json.loads(line)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def make_runs(root: Path) -> tuple[Path, Path, Path]:
    """A tiny base (pretrain) and a LoRA fine-tune of it with training state; the corpus."""
    from lowrank.app import workflows as wf
    from lowrank.training.trainer import TrainConfig
    corpus = root / "corpus.txt"
    corpus.write_text((ROOT / "lowrank" / "files" / "storage.py").read_text() * 2)
    data = wf.DataSpec([str(corpus)], max_bytes=60_000)
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    train = TrainConfig(steps=2, batch_size=2, lr=1e-3, min_lr=1e-4, warmup=0)
    wf.pretrain(root / "base", spec, data, train, progress=False)
    wf.finetune(root / "ft", root / "base", "lora", ["q", "v"], {"r": 2, "alpha": 4.0}, data,
                train, progress=False)
    return root / "base", root / "ft", corpus
