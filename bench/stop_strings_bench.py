"""OpenAI stop strings on the http actor's event loop: the time `StopStringText` takes per token
(push and release, as the route does for each token it forwards), with 16 stop strings of 1,000
characters (the most a request may send) that never match, over a long answer.

The baseline is `vlmd/detokenizer.py` as it is at `--baseline` (a git revision), loaded beside
the current one in this process, so both run on the same tokens:

    python bench/stop_strings_bench.py --baseline 1e9c11d [--tokens 2000]

Printed: for each, the median and the largest time of one token (ms) over the last 200 tokens
(the answer is longest there) and the whole answer's time (s).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlmd import detokenizer

ROOT = Path(__file__).resolve().parents[1]


class PieceTokenizer:
    """Token i decodes to PIECES[i % len(PIECES)]: text that begins no stop string but its
    first character, so every end of it is looked at."""

    PIECES = ("ab", "ca", "b ", "ab")

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i % len(self.PIECES)] for i in ids)


def load_baseline(revision: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:vlmd/detokenizer.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "detokenizer_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("detokenizer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module, num_tokens: int, stops: list[str]) -> tuple[list[float], float]:
    text = module.StopStringText(PieceTokenizer(), stops)
    times = []
    started = time.perf_counter()
    for token in range(num_tokens):
        t = time.perf_counter()
        text.push(token)
        text.release()
        times.append(time.perf_counter() - t)
    assert not text.stopped
    return times, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision of the baseline detokenizer")
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    # Each begins with "a" (so a tail starting at an "a" is looked at) and then never matches.
    stops = ["a" + "z" * 998 + str(i % 10) for i in range(16)]
    print(
        f"{datetime.date.today()} {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}"
    )
    print(f"16 stop strings of {len(stops[0])} characters, {args.tokens} tokens")
    for name, module in (
        ("baseline " + args.baseline, load_baseline(args.baseline)),
        ("current", detokenizer),
    ):
        times, total = run(module, args.tokens, stops)
        last = [t * 1e3 for t in times[-200:]]
        print(
            f"{name:>18}: per token median {statistics.median(last):.4f} ms, max {max(last):.4f} ms "
            f"(last 200 tokens); whole answer {total:.3f} s"
        )


if __name__ == "__main__":
    main()
