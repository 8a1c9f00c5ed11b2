"""The table of benchmarks/gpu_check.sh: each phase's result file, summaries of the JSON that `cfmae bench` and
pytest write, and the one table printed at the end (phase | result | numbers | seconds).

Standard library only, so that it works before anything is installed.

  python benchmarks/gpu_check_table.py step BENCH.json --result DIR/result.json     # a phase's summary
  python benchmarks/gpu_check_table.py record --table OUT/table.json --phase P --rc RC --seconds S --dir DIR
  python benchmarks/gpu_check_table.py print --table OUT/table.json --markdown OUT/table.md

A phase writes ``result.json`` ({"result": "PASS" | "FAIL" | "SKIPPED (why)", "numbers": "..."}) into its own
folder; ``record`` turns it (or the exit code, when the phase was killed or wrote none) into the row.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TIMEOUT_CODES = (124, 137)  # timeout(1): the budget ran out (124), or the phase ignored SIGTERM and was killed


def write_result(path: Path, result: str, numbers: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"result": result, "numbers": numbers}) + "\n")


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "?"


def summarise_step(report: dict[str, Any]) -> tuple[str, str]:
    """img/s, MFU (or achieved TFLOP/s where the card's peak is unknown) and ms/step of each preset."""
    parts, ok = [], True
    for name, entry in (report.get("presets") or {}).items():
        step = entry.get("step") or {}
        if not isinstance(step.get("img_per_s"), (int, float)):
            ok = False
            parts.append(f"{name}: no step timing")
            continue
        mfu = entry.get("mfu")
        rate = f"MFU {100 * mfu:.1f} %" if isinstance(mfu, (int, float)) else \
            f"{_num(entry.get('achieved_tflops'), '{:.3g}')} TFLOP/s (no peak known)"
        parts.append(f"{name}: {step['img_per_s']:,.1f} img/s, {rate}, {_num(step.get('ms_per_step'), '{:,.1f}')} "
                     f"ms/step" + (f", {step['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in step else ""))
    if not parts:
        return "FAIL", "no preset in the JSON"
    if isinstance(report.get("step_time_ratio"), (int, float)):
        parts.append(f"step time ratio {report['step_time_ratio']:.2f}")
    batch = report.get("batch_size")
    head = f"batch {batch}{', compiled' if report.get('compiled') else ', eager'}: "
    return ("PASS" if ok else "FAIL"), head + "; ".join(parts)


def summarise_masks(report: dict[str, Any]) -> tuple[str, str]:
    for name, entry in (report.get("presets") or {}).items():
        masks = entry.get("masks_ms")
        if isinstance(masks, dict) and masks:
            return "PASS", f"{name}: " + ", ".join(f"{k} {_num(v, '{:.2f}')} ms" for k, v in masks.items())
    return "FAIL", "no mask timings in the JSON"


def data_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for entry in (report.get("presets") or {}).values():
        for row in entry.get("data") or []:
            if isinstance(row, dict) and isinstance(row.get("samples_per_s"), (int, float)):
                rows.append(row)
    return rows


def summarise_data(reports: list[dict[str, Any]]) -> tuple[str, str]:
    """The best samples/s of each kind of data path over its worker counts. A kind is the text fields of a row
    (format, reader, device, ...: whatever `cfmae bench` writes), so new kinds of rows (GPU decoding) show up
    as their own, with the device's ms per sample where the row has it."""
    best: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in data_rows(report):
            kind = " ".join(str(v) for k, v in row.items() if isinstance(v, str))
            if kind not in best or row["samples_per_s"] > best[kind]["samples_per_s"]:
                best[kind] = row
    if not best:
        return "FAIL", "no data-path rows in the JSON"
    parts = []
    for kind, r in best.items():
        device = r.get("device_ms_per_sample")
        extra = f", device {device:.2f} ms/sample" if isinstance(device, (int, float)) else ""
        parts.append(f"{kind or 'data'}: {r['samples_per_s']:,.1f} samples/s ({r.get('workers', '?')} workers{extra})")
    return "PASS", "; ".join(parts)


def summarise_junit(path: Path) -> tuple[str, str]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    failed = [f"{c.get('classname', '')}::{c.get('name', '')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    numbers = f"{passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped"
    if failed:
        numbers += " (" + ", ".join(failed[:4]) + (", ..." if len(failed) > 4 else "") + ")"
    return ("PASS" if passed and not failed else "FAIL"), numbers


def last_line(path: Path) -> str:
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def record(table: Path, phase: str, rc: int, seconds: float, folder: Path, budget: float, keep: bool) -> dict:
    """The row of ``phase`` from its exit code and result file, put into ``table`` (a fresh table unless
    ``keep``: then the other phases' rows of the last run stay, for a rerun of some phases)."""
    result_file = folder / "result.json"
    try:
        written = json.loads(result_file.read_text())
    except (OSError, ValueError):
        written = None
    if rc in TIMEOUT_CODES:
        row = {"result": "TIMEOUT", "numbers": f"killed after its budget of {budget:.0f} s; "
               f"last output: {last_line(folder / 'log.txt')}"}
    elif written is None:
        row = {"result": "FAIL", "numbers": f"exit {rc}, no result; last output: {last_line(folder / 'log.txt')}"}
    elif rc != 0 and not str(written.get("result", "")).startswith("FAIL"):
        row = {"result": "FAIL", "numbers": f"exit {rc} after: {written.get('numbers', '')}"}
    else:
        row = {"result": str(written.get("result", "FAIL")), "numbers": str(written.get("numbers", ""))}
    row.update(phase=phase, seconds=round(seconds, 1))
    state: dict[str, Any] = {"rows": {}}
    if keep and table.exists():
        try:
            state = json.loads(table.read_text())
        except ValueError:
            pass
    state.setdefault("rows", {})[phase] = row
    table.write_text(json.dumps(state, indent=2) + "\n")
    return row


def render(state: dict[str, Any], order: list[str], markdown: bool = False) -> str:
    rows = [state["rows"].get(p) or {"phase": p, "result": "NOT RUN", "numbers": "", "seconds": ""} for p in order]
    rows += [r for p, r in state["rows"].items() if p not in order]
    cells = [["phase", "result", "numbers", "seconds"]] + [
        [str(r[k]).replace("|", "/") for k in ("phase", "result", "numbers", "seconds")] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join([lines[0], "|---|---|---|---:|", *lines[1:]]) + "\n"
    width = [max(len(row[i]) for row in cells) for i in (0, 1)]
    out = []
    for k, row in enumerate(cells):
        out.append(f"{row[0]:<{width[0]}} | {row[1]:<{width[1]}} | {row[2]} | {row[3]}")
        if k == 0:
            out.append("-" * (width[0] + 1) + "+" + "-" * (width[1] + 2) + "+" + "-" * 9 + "+" + "-" * 8)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("step", "masks", "data", "junit"):
        p = sub.add_parser(name)
        p.add_argument("inputs", nargs="+", type=Path)
        p.add_argument("--result", type=Path, required=True)
    p = sub.add_parser("record")
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--phase", required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--budget", type=float, default=0)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--keep", action="store_true", help="keep the other phases' rows of the last run")
    p = sub.add_parser("skip")
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--why", required=True)
    p.add_argument("--numbers", default="")
    p = sub.add_parser("print")
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--order", default="")
    p.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.cmd in ("step", "masks", "data"):
        reports = [json.loads(p.read_text()) for p in args.inputs if p.exists()]
        fn = {"step": lambda: summarise_step(reports[0]), "masks": lambda: summarise_masks(reports[0]),
              "data": lambda: summarise_data(reports)}[args.cmd]
        result, numbers = fn() if reports else ("FAIL", "no JSON written")
        write_result(args.result, result, numbers)
    elif args.cmd == "junit":
        write_result(args.result, *summarise_junit(args.inputs[0]))
    elif args.cmd == "skip":
        write_result(args.result, f"SKIPPED ({args.why})", args.numbers)
    elif args.cmd == "record":
        row = record(args.table, args.phase, args.rc, args.seconds, args.dir, args.budget, args.keep)
        print(f"-> {row['result']} ({row['seconds']} s) {row['numbers']}")
    else:
        state = json.loads(args.table.read_text())
        order = [p for p in args.order.split(",") if p]
        text = render(state, order)
        print(text, end="")
        if args.markdown:
            args.markdown.write_text(render(state, order, markdown=True))
        bad = [r["phase"] for r in state["rows"].values() if r["result"].split()[0] in ("FAIL", "TIMEOUT")]
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
