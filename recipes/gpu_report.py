#!/usr/bin/env python
"""The GPU check's one table: every figure of recipes/gpu_check.sh's steps, and the targets checked.

    python recipes/gpu_report.py OUT_DIR [--total-s S] [--budget-s S]

Reads what the steps left in OUT_DIR (steps.tsv, env.json, pytest.xml, bench_1b.json,
bench_8b.json, bench_online_1b.json, families.json, bench_1b_more.json; any may be missing: a step that did not
finish shows as such),
prints one markdown table and writes it to OUT_DIR/report.md (and the rows to report.json).
Targets (issue 14), each judged on figures measured in the same run:
  1B: our DPO (c, cold cache: what a first epoch gets) >= 2.5x stock TRL's pairs/s (a), >= 1.5x tuned
      TRL's (b), peak memory <= a's, >= 40% of the measured bf16 matmul ceiling; the same listed for
      c-warm (cache filled: later epochs, reruns, sweeps) apart;
  8B QLoRA: c >= 1.8x a's pairs/s, each at its largest batch.
Online (issue 18), 1B: our GRPO step >= 2x TRL GRPOTrainer's responses/s at no more peak memory, and
  TRL's rewards through our group advantages give TRL's advantages (correctness).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

COLUMNS = ("part", "what", "status", "batch", "s/step", "pairs/s", "tokens/s", "peak MB", "TFLOP/s", "% ceiling", "notes")


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_rows(out: Path) -> tuple[list[dict], dict[str, str]]:
    rows, status = [], {}
    try:
        lines = (out / "steps.tsv").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, state, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        status[name] = state
        rows.append({"part": "step", "what": name, "status": state, "s/step": "", "notes": f"{seconds} s; {note}"})
    return rows, status


def pytest_rows(out: Path, state: str | None) -> list[dict]:
    try:
        root = ET.parse(out / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return [{"part": "pytest", "what": "pytest -m gpu", "status": state or "not run", "notes": "no pytest.xml"}] if state else []
    rows = []
    for case in root.iter("testcase"):
        outcome, note = "passed", ""
        for child in case:
            message = ((child.get("message") or "").splitlines() or [""])[0][:120]
            if child.tag in ("failure", "error"):
                outcome, note = "FAILED", message
            elif child.tag == "skipped":
                outcome, note = "skipped", message
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        rows.append({"part": "pytest", "what": name, "status": outcome, "notes": f"{float(case.get('time', 0)):.1f} s {note}".strip()})
    return rows


def bench_rows(data: dict | None, part: str, state: str | None) -> list[dict]:
    if not data:
        return [{"part": part, "what": "-", "status": state or "not run", "notes": "no results"}] if state else []
    rows = []
    ceiling = data.get("ceiling_tflops")
    if ceiling:
        rows.append({"part": part, "what": "bf16 matmul ceiling", "status": "measured", "TFLOP/s": f"{ceiling:.0f}",
                     "notes": f"{data.get('device', '')}; {data.get('shape')} ({data.get('non_embedding_params', 0) / 1e6:.0f} M non-embedding params, {data.get('quantization')})"})
    for r in data.get("results", []):
        if "skipped" in r:
            rows.append({"part": part, "what": r["variant"], "status": "not timed", "notes": r["skipped"]})
            continue
        if "error" in r:
            rows.append({"part": part, "what": r["variant"], "status": "FAILED", "notes": r["error"]})
            continue
        notes = [f"grad ckpt {'on' if r.get('gradient_checkpointing') else 'off'}"]
        if r.get("liger"):
            notes.append("Liger")
        if r.get("fast_path"):
            notes.append(r["fast_path"].replace("DPO fast path: ", "").split(";")[0])
        if "cache_hits" in r:
            notes.append(f"cache {r['cache_hits']} hits / {r['cache_misses']} misses")
        rows.append({
            "part": part, "what": r["variant"], "status": "measured",
            "batch": f">={r['batch']} (cap)" if r.get("batch_is_cap") else str(r.get("batch", "")),
            "s/step": f"{r['median_step_s']:.3f}", "pairs/s": f"{r['pairs_per_s']:.2f}",
            "tokens/s": f"{r['tokens_per_s']:.0f}", "peak MB": f"{r['peak_memory_mb']:.0f}",
            "TFLOP/s": f"{r['tflops']:.0f}" if "tflops" in r else "",
            "% ceiling": f"{100 * r['share_of_ceiling']:.0f}%" if "share_of_ceiling" in r else "",
            "notes": "; ".join(notes),
        })
    for x in data.get("ratios", []):  # written when the bench finished
        rows.append({"part": part, "what": f"{x['mine']} / {x['other']}", "status": "ratio",
                     "pairs/s": f"{x['pairs_per_s']:.2f}x", "peak MB": f"{x['peak_memory']:.2f}x"})
    if state and state != "ok":
        rows.append({"part": part, "what": "(step)", "status": state, "notes": "results above are what it measured before it stopped"})
    return rows


def target_rows(one_b: dict | None, eight_b: dict | None) -> list[dict]:
    rows = []

    def measured(data):
        return {r["variant"]: r for r in (data or {}).get("results", []) if "median_step_s" in r}

    def row(what, value, goal, ok, shown):
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        rows.append({"part": "target", "what": what, "status": status, "notes": f"{shown} (target {goal})" if value is not None else f"not measured (target {goal})"})

    one = measured(one_b)
    for mine in ("c", "c-warm"):
        if mine not in one:
            continue
        m = one[mine]
        label = f"1B {mine}" + (" (cold cache: a first epoch)" if mine == "c" else " (cache filled)")
        for other, goal in (("a", 2.5), ("b", 1.5)):
            if other in one:
                x = m["pairs_per_s"] / one[other]["pairs_per_s"]
                row(f"{label} / {other} pairs/s", x, f">= {goal}x", x >= goal, f"{x:.2f}x")
            else:
                row(f"{label} / {other} pairs/s", None, f">= {goal}x", None, "")
        if "a" in one:
            x = m["peak_memory_mb"] / one["a"]["peak_memory_mb"]
            row(f"{label} peak memory / a", x, "<= 1.00x", x <= 1.0, f"{x:.2f}x ({m['peak_memory_mb']:.0f} vs {one['a']['peak_memory_mb']:.0f} MB)")
        if "share_of_ceiling" in m:
            x = m["share_of_ceiling"]
            row(f"{label} share of bf16 ceiling", x, ">= 40%", x >= 0.40, f"{100 * x:.0f}%")
    eight = measured(eight_b)
    if "c" in eight and "a" in eight:
        a, c = eight["a"], eight["c"]
        x = c["pairs_per_s"] / a["pairs_per_s"]
        caps = " (a batch at the cap: a larger one may fit)" if a.get("batch_is_cap") else ""
        row("8B QLoRA c / a pairs/s, each at its largest batch", x, ">= 1.8x", x >= 1.8,
            f"{x:.2f}x at batch {c['batch']} vs {a['batch']}{caps}")
    elif eight_b is not None:
        row("8B QLoRA c / a pairs/s, each at its largest batch", None, ">= 1.8x", None, "")
    return rows


def online_rows(data: dict | None, state: str | None) -> list[dict]:
    """bench_online's JSON: each variant's figures (responses/s in the pairs/s column), the targets judged."""
    part = "bench online 1B"
    if not data:
        return [{"part": part, "what": "-", "status": state or "not run", "notes": "no bench_online_1b.json"}] if state else []
    rows, by = [], {}
    for r in data.get("results", []):
        if "error" in r:
            rows.append({"part": part, "what": r["variant"], "status": "FAILED", "notes": r["error"]})
            continue
        by[r["variant"]] = r
        rows.append({"part": part, "what": r["variant"], "status": "measured", "s/step": f"{r['median_step_s']:.3f}",
                     "pairs/s": f"{r['responses_per_s']:.2f}", "tokens/s": f"{r['tokens_per_s']:.0f}", "peak MB": f"{r['peak_memory_mb']:.0f}",
                     "notes": f"responses/s; grad ckpt {'on' if r.get('gradient_checkpointing') else 'off'}; {data.get('settings', '')}"[:200]})
    if "ours" in by and "trl" in by:
        speed = by["ours"]["responses_per_s"] / by["trl"]["responses_per_s"]
        memory = by["ours"]["peak_memory_mb"] / by["trl"]["peak_memory_mb"]
        rows.append({"part": "target", "what": "online 1B ours / trl responses/s", "status": "PASS" if speed >= 2.0 else "FAIL",
                     "notes": f"{speed:.2f}x (target >= 2x)"})
        rows.append({"part": "target", "what": "online 1B ours peak memory / trl", "status": "PASS" if memory <= 1.0 else "FAIL",
                     "notes": f"{memory:.2f}x (target <= 1.00x)"})
    if "correctness_ok" in data:
        rows.append({"part": "target", "what": "online 1B group advantages = TRL's", "status": "PASS" if data["correctness_ok"] else "FAIL",
                     "notes": next((line for line in data.get("table", []) if line.startswith("correctness")), "")[:200]})
    if state and state != "ok":
        rows.append({"part": part, "what": "(step)", "status": state, "notes": "results above are what it measured before it stopped"})
    return rows


def family_rows(data, state: str | None) -> list[dict]:
    """The families smoke test's JSON: a list of entries (or {"results": [...]}) with a name and a status."""
    if data is None:
        return [{"part": "families", "what": "-", "status": state or "not run", "notes": "no families.json"}] if state else []
    entries = data.get("results", data.get("families", [])) if isinstance(data, dict) else data
    if isinstance(entries, dict):
        entries = [{"family": k, **(v if isinstance(v, dict) else {"status": v})} for k, v in entries.items()]
    rows = []
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict):
            continue
        name = e.get("family") or e.get("name") or "?"
        status = e.get("status") or ("ok" if e.get("ok") else "failed" if "ok" in e else "")
        notes = "; ".join(f"{k} {v}" for k, v in e.items()
                          if k not in ("family", "name", "status", "ok") and isinstance(v, (int, float, str, bool)))
        rows.append({"part": "families", "what": str(name), "status": str(status), "notes": notes[:200]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines)


def report(out: Path, total_s: float | None = None, budget_s: float | None = None) -> tuple[str, list[dict]]:
    env = load_json(out / "env.json") or {}
    steps, status = step_rows(out)
    rows = []
    if env:
        versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
        rows.append({"part": "device", "what": env.get("gpu", "?"), "status": f"{env.get('memory_gib', '?')} GiB", "notes": versions})
    one_b, eight_b = load_json(out / "bench_1b.json"), load_json(out / "bench_8b.json")
    rows += pytest_rows(out, status.get("pytest"))
    rows += bench_rows(one_b, "bench 1B", status.get("bench-1b"))
    rows += bench_rows(eight_b, "bench 8B QLoRA", status.get("bench-8b"))
    rows += online_rows(load_json(out / "bench_online_1b.json"), status.get("bench-online-1b"))
    rows += bench_rows(load_json(out / "bench_1b_more.json"), "bench 1B ablations", status.get("bench-1b-more"))
    rows += family_rows(load_json(out / "families.json"), status.get("families"))
    rows += target_rows(one_b, eight_b)
    rows += steps
    if total_s is not None:
        rows.append({"part": "step", "what": "total", "status": "ok" if budget_s is None or total_s <= budget_s else "over budget",
                     "notes": f"{total_s:.0f} s" + (f" of {budget_s:.0f} s" if budget_s else "")})
    return table(rows), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--total-s", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=None)
    args = p.parse_args(argv)
    if not args.out.is_dir():
        print(f"gpu_report: {args.out} is not a directory", file=sys.stderr)
        return 2
    text, rows = report(args.out, args.total_s, args.budget_s)
    print(text)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "report.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
