"""Benchmark `align-data build` on a large generated input; prints rows/s and peak memory.

    python -m data_tools.bench_build                      # 1,000,000 rows
    python -m data_tools.bench_build --rows 100000,1000000   # several sizes: memory should not grow with them
    python -m data_tools.bench_build -- --near-dup off        # extra build options after --

The input is a `ratings` JSONL file (one row per rated response, 4 responses per prompt) whose
rows are shuffled across the whole file, so every prompt's responses must be brought together;
about 2% of prompts are near-duplicate rewordings of another and 0.5% of rows are exact
repeats, so the dedup paths run too. Each build runs in a child process (default options:
best-vs-worst pairing, MinHash near-dup, 5% test split, Parquet + save_to_disk + plots); its
peak resident memory comes from the kernel (wait4 rusage and /proc VmHWM sampling), its speed
is input rows per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house service "
    "friend father power hour game line end member law car city community name president team minute idea kid body "
    "information back parent face others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education explain describe compare list write summarize why how"
).split()


def make_input(path: Path, rows: int, per_prompt: int, seed: int) -> int:
    """Write `rows` rating rows; returns the number of prompts."""
    rng = random.Random(seed)
    n_prompts = rows // per_prompt
    prompts = []
    for i in range(n_prompts):
        if i > 50 and rng.random() < 0.02:  # a near-duplicate rewording of an earlier prompt
            base = prompts[rng.randrange(i)]
            prompts.append(base.replace("?", " please?", 1) if "?" in base else base + " please")
        else:
            n = rng.randint(10, 30)
            prompts.append(f"Q{i}: " + " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "?")
    order = [(p, r) for p in range(n_prompts) for r in range(per_prompt)]
    rng.shuffle(order)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for p, r in order:
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            line = json.dumps({"prompt": prompts[p], "response": f"({r}) {response}", "score": round(rng.uniform(1, 10), 1)})
            f.write(line + "\n")
            written += 1
            if rng.random() < 0.005 and written < rows:  # an exact repeat of the row
                f.write(line + "\n")
                written += 1
            if written >= rows:
                break
    return n_prompts


def run_build(input_path: Path, output: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "data_tools", "build", "--format", "ratings", "--input", str(input_path),
           "--output", str(output), *extra]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    hwm = [0]

    def sample() -> None:  # VmHWM is the kernel's own peak-RSS record for the process
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    wall = time.time() - started
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "maxrss_mb": usage.ru_maxrss / 1024, "vmhwm_mb": hwm[0] / 1024,
            "summary": out.strip().splitlines()[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1000000", help="input sizes, comma-separated (default 1000000)")
    p.add_argument("--per-prompt", type=int, default=4, help="rated responses per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the input and output go (default: a temp dir, removed after)")
    p.add_argument("build_args", nargs="*", help="extra align-data build options (after --), e.g. -- --near-dup off")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            src = Path(tmp) / f"ratings-{rows}.jsonl"
            t = time.time()
            prompts = make_input(src, rows, args.per_prompt, args.seed)
            size_mb = src.stat().st_size / 2**20
            print(f"input: {rows:,} rows, {prompts:,} prompts, {size_mb:.0f} MiB ({time.time() - t:.0f} s to generate)", flush=True)
            res = run_build(src, Path(tmp) / f"out-{rows}", args.build_args)
            print(f"  build: {res['wall_s']:.1f} s wall, {rows / res['wall_s']:,.0f} rows/s, "
                  f"peak RSS {res['maxrss_mb']:.0f} MiB (wait4 maxrss), {res['vmhwm_mb']:.0f} MiB (VmHWM)", flush=True)
            print(f"  {res['summary']}", flush=True)
            src.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
