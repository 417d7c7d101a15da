"""The hardening batteries (tests/test_hardening_*.py) at length: random (not derandomized)
Hypothesis examples, many of them, and a table of outcomes per battery.

    python benchmarks/hardening_battery.py --examples 2000

Outcomes that must not occur (the tests fail on the first one): traceback, hang, memory,
wrong (a corrupted directory loaded other numbers than were saved), nan, unnamed (an error
that names no file or field), multiline, internal. The others: ok / identical (loaded what
was saved), refused (one line naming the file or field), stopped (training stopped on a
non-finite value), broken-pipe (stdout closed: exit 141, silent), forged-loaded (a JSON edited
and re-sealed by hand, as a forger would: refused or loaded, never a crash), loaded (a
tokenizer or data file the library accepts), changed-setting (a config setting that is not a
size, e.g. tied embeddings, changed what loads). The corrupted-file batteries also report the
loader worker's peak resident memory.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/hardening/test_api.py", "tests/hardening/test_cli.py",
         "tests/hardening/test_files.py", "tests/hardening/test_inputs.py",
         "tests/hardening/test_dirs.py"]
FILES += ["tests/hardening/test_peft.py"]   # PEFT configs and tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000, help="examples per generated battery")
    ap.add_argument("--profile", default="dev", help="Hypothesis profile (tests/conftest.py)")
    args = ap.parse_args()
    report = Path(tempfile.mkdtemp(prefix="hardening-")) / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYPOTHESIS_PROFILE": args.profile,
           "HARDENING_EXAMPLES": str(args.examples), "HARDENING_REPORT": str(report)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *FILES], cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
    counts = json.loads(report.read_text()) if report.exists() else {}
    peaks = counts.pop("__peak_rss_mb__", {})
    outcomes = sorted({o for c in counts.values() for o in c})
    print("| battery | cases | " + " | ".join(outcomes) + " |")
    print("|---|---:|" + "---:|" * len(outcomes))
    for battery in sorted(counts):
        c = counts[battery]
        print(f"| {battery} | {sum(c.values())} | "
              + " | ".join(str(c.get(o, 0)) for o in outcomes) + " |")
    for battery in sorted(peaks):   # the loader worker runs under an address-space cap
        print(f"peak resident memory of the {battery} worker: {peaks[battery]:.0f} MB")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
