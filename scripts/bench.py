"""The benchmark harness: runs every section in scripts/benchmarks/ and writes one Markdown report.

    python scripts/bench.py                  # all sections -> docs/bench.md
    python scripts/bench.py --only attention --runs 5 --out /tmp/bench.md

Each section module exposes `run(options) -> list[Table]`; timings are ratios taken within one
run (interleaved), FLOPs come from real-size architectures built on the meta device.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import benchmarks  # noqa: E402


def sections() -> list[str]:
    # common holds shared code; _-prefixed modules are helpers (e.g. subprocess workers), not sections.
    names = (m.name for m in pkgutil.iter_modules(benchmarks.__path__))
    return sorted(name for name in names if name != "common" and not name.startswith("_"))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {gpu}; python {platform.python_version()}, "
            f"torch {torch.__version__}, torch threads {torch.get_num_threads()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"sections to run (default all: {', '.join(sections())})")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench.md"))
    options = parser.parse_args(argv)
    chosen = options.only or sections()
    unknown = sorted(set(chosen) - set(sections()))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: no such section; sections are {', '.join(sections())}")

    parts = [f"# hires benchmarks\n\nDate: {datetime.date.today()}  \nMachine: {machine()}  \n"
             f"Timed rounds per measurement: {options.runs} (interleaved; ratios of medians within one run)\n"]
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        start = time.perf_counter()
        tables = importlib.import_module(f"benchmarks.{name}").run(options)
        parts.append(f"## {name}\n\n(section wall time {time.perf_counter() - start:.0f} s)\n")
        parts += [t.markdown() for t in tables]
        print(f"[bench] {name}: {len(tables)} table(s) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        out.write_text("\n".join(parts))  # after every section: a failing section keeps the others' tables
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
