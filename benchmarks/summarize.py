"""Prints the benchmark summary tables from pytest-benchmark JSON files, for any op family.

    python benchmarks/summarize.py build/bench.json [more.json ...] [--markdown out.md] [--plot out.png]
    python benchmarks/summarize.py build/bench.rows.jsonl ...   (MMFAST_BENCH_ROWS, conftest.py)

A row is every benchmark whose extra_info was written by _utils.record_metrics (it has "op").
One table per benchmark file (op family), each with the baselines its rows measured: `<name> ms`
and `speedup vs <name>` (baseline time / mmfast time, measured in the same run; paired rows give
the median of per-round ratios). Timed modes of mmfast itself (`mmfast_eager`, `static_plan`,
`triton`) get a time column only. "key ratios" holds the figures a row's target is judged on
where they are not the speedup (paired per-round medians such as mmfast/dense, a step over its
floor); "other targets" the further targets a row checks. A row marked "!" ended while the
host's load exceeded its cores (other work shared them: its times are suspect). Each table ends
with how many of its targets were met.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

LEADING = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("mmfast ms", "mmfast_ms")]
TRAILING = [("throughput", "throughput"), ("GB/s", "gbps"), ("TFLOP/s", "tflops"), ("% of peak FLOP/s", "pct_of_peak_flops"),
            ("% of BW floor", "pct_of_floor"),
            ("key ratios", "_key_ratios"), ("target", "target"), ("met", "target_met"),
            ("other targets", "_other_targets")]
MODES = ("static_plan", "triton")  # _utils.MMFAST_MODES (summarize.py runs without torch)


def _is_mode(name):
    return name.startswith("mmfast_") or name in MODES


def _family(test_id):
    """'bench_vq.py::test_x[...]' (or a path to it) -> 'vq'."""
    stem = os.path.basename(str(test_id).split("::")[0])
    return stem[len("bench_"):-len(".py")] if stem.startswith("bench_") and stem.endswith(".py") else stem or "?"


def load(path):
    """(rows, benchmarks without a row, skipped benchmarks, machine info, commit info, datetime) of
    a pytest-benchmark JSON file, or of a MMFAST_BENCH_ROWS file (.jsonl: one row a line, written as
    each benchmark ended; a rerun appends, so the last row of each test is kept; no machine or
    commit info). Skipped: {"test", "skipped": reason} entries (conftest.py), whose targets went
    ungraded in that run."""
    if not os.path.exists(path):
        sys.exit(f"summarize: {path} does not exist (did the benchmarks run with --benchmark-json={path}? "
                 "--benchmark-disable writes none: set MMFAST_BENCH_ROWS=rows.jsonl for smoke runs)")
    if str(path).endswith(".jsonl"):
        latest, skipped = OrderedDict(), OrderedDict()
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:  # the last line of a run killed mid-write
                    print(f"summarize: {path}:{number} is not a whole JSON row; skipped", file=sys.stderr)
                    continue
                if "skipped" in row:
                    skipped[row.get("test")] = row
                    continue
                latest.pop(row.get("test"), None)
                latest[row.get("test")] = row
        rows = [dict(row, _family=_family(row.get("test", ""))) for row in latest.values() if "op" in row]
        return rows, [], [row for test, row in skipped.items() if test not in latest], {}, {}, ""
    try:
        with open(path) as f:
            data = json.load(f)
        benchmarks = data["benchmarks"]
    except (ValueError, KeyError, TypeError) as error:
        sys.exit(f"summarize: {path} is not a complete pytest-benchmark JSON file ({type(error).__name__}: "
                 f"{error}); a run cut off before it ended writes none: summarize its MMFAST_BENCH_ROWS file")
    rows, missing = [], []
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "op" in info:
            rows.append(dict(info, _family=_family(bench.get("fullname", ""))))
        else:
            missing.append(bench.get("fullname", bench.get("name", "?")))
    return (rows, missing, data.get("skipped", []), data.get("machine_info", {}), data.get("commit_info", {}),
            data.get("datetime", ""))


def _key_ratios(info):
    names = [key for key, value in info.items() if key.endswith("_ratio") and isinstance(value, (int, float))
             and not isinstance(value, bool)]
    return ", ".join(f"{key[:-len('_ratio')].replace('_', ' ')} {info[key]}" for key in names)


def _other_targets(info):
    return ", ".join(f"{key[:-len('_target_met')].replace('_', ' ')}: {_fmt(value)}" for key, value in info.items()
                     if key.endswith("_target_met") and not key.startswith("smoke_"))  # a smoke run grades nothing


def columns_for(infos):
    """The leading columns, one (ms, speedup) pair per baseline in first-seen order (a time column
    alone for mmfast's own modes and for baselines that recorded no time), the trailing ones."""
    names = []
    for info in infos:  # "timed": a row's timed contenders; plus speedups recorded without a time
        timed = list(info.get("timed") or []) + [key[len("speedup_vs_"):] for key in info
                                                  if key.startswith("speedup_vs_")]
        for name in timed:
            if name not in names:
                names.append(name)
    middle = []
    for name in names:
        if any(f"{name}_ms" in info for info in infos):
            middle.append((f"{name} ms", f"{name}_ms"))
        if not _is_mode(name) and any(f"speedup_vs_{name}" in info for info in infos):
            middle.append((f"speedup vs {name}", f"speedup_vs_{name}"))
    trailing = [(title, key) for title, key in TRAILING
                if any((key.startswith("_") and globals()[key](info)) or info.get(key) is not None for info in infos)]
    return LEADING + middle + trailing


def _fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def rows_for(infos, columns):
    rows = []
    for info in infos:
        cells = []
        for _, key in columns:
            value = globals()[key](info) if key.startswith("_") else info.get(key)
            cells.append("" if value is None and key != "target_met" else _fmt(value))
        if (info.get("load_per_core") or 0) > 1.0:
            cells[0] = "! " + cells[0]
        rows.append(cells)
    return rows


def text_table(rows, columns):
    headers = [title for title, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(rows, columns):
    headers = [title for title, _ in columns]
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in r) + " |" for r in rows]
    return "\n".join(out)


def target_count(infos):
    """'m of n targets met' over the rows that judged one (n/a: not judged by this row)."""
    judged = [info["target_met"] for info in infos if info.get("target") and info.get("target_met") is not None]
    return f"{sum(judged)} of {len(judged)} targets met" if judged else "no targets judged"


def by_family(infos):
    families = OrderedDict()
    for info in infos:
        families.setdefault(info["_family"], []).append(info)
    return families


def plot(infos, path):
    """One bar per row: the speedup over the row's primary baseline (log scale: 1x in the middle)."""
    try:
        import matplotlib
    except ImportError:
        print(f"summarize: matplotlib is not installed, {path} not written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{info['op']}  {info['shape']}  (vs {info['baseline']})", info[f"speedup_vs_{info['baseline']}"])
            for info in infos if "baseline" in info and info.get(f"speedup_vs_{info['baseline']}")]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(13, 0.35 * len(bars) + 1.8))
    values = [value for _, value in bars]
    ax.barh([label for label, _ in bars], values, color=["tab:blue" if v >= 1 else "tab:red" for v in values])
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of mmfast over the row's primary baseline, measured in the same run (x, log scale; "
                  "red: slower)")
    families = sorted({info["_family"] for info in infos})
    ax.set_title(f"mmfast ({len(families)} families) on {infos[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def header(machine, commit, when, infos):
    cpu = machine.get("cpu", {}).get("brand_raw", "") or (infos[0]["device"] if infos else "")
    # rows timed on a GPU name it (machine_name): the header says so, with the host CPU after it
    gpus = sorted({info["device"] for info in infos if info.get("device") and info["device"] != cpu
                   and not info["device"].startswith(cpu or "\0")})
    if gpus:
        cpu = f"{' / '.join(gpus)} (host: {cpu})" if cpu else " / ".join(gpus)
    dirty = " (uncommitted changes)" if commit.get("dirty") else ""
    parts = [f"Commit {commit.get('id', '?')[:10]}{dirty}" if commit else "Commit unknown (rows file)",
             when[:19].replace("T", " ") + " UTC" if when else "", cpu,
             f"torch {machine['torch']}" if machine.get("torch") else "",
             f"{machine['threads']} threads" if machine.get("threads") else ""]
    return ", ".join(part for part in parts if part)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files and/or MMFAST_BENCH_ROWS .jsonl files")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args()
    infos, missing, skipped, machine, commit, when = [], [], [], {}, {}, ""
    for path in args.json:
        rows, lost, not_run, machine_, commit_, when_ = load(path)
        infos += rows
        missing += lost
        skipped += not_run
        machine, commit, when = machine or machine_, commit or commit_, when or when_
    text, markdown = [header(machine, commit, when, infos)], [header(machine, commit, when, infos)]
    for family, rows in by_family(infos).items():
        columns = columns_for(rows)
        cells = rows_for(rows, columns)
        text += ["", f"== {family}: {target_count(rows)}", text_table(cells, columns)]
        markdown += ["", f"### {family}: {target_count(rows)}", "", markdown_table(cells, columns)]
    notes = [f"Overall: {target_count(infos)} ({len(infos)} rows)."]
    if any((info.get("load_per_core") or 0) > 1.0 for info in infos):
        notes.append("Rows marked ! ended while the host's 1-minute load exceeded its cores: their times are suspect.")
    if missing:
        notes.append(f"{len(missing)} benchmarks wrote no summary row: " + ", ".join(missing))
    if skipped:
        notes.append(f"{len(skipped)} benchmarks (or files) did not run here, their targets not graded:")
    text += [""] + notes + [f"  {entry['test']}: {entry['skipped']}" for entry in skipped]
    markdown += [""] + notes + [f"- `{entry['test']}`: {entry['skipped']}" for entry in skipped]
    print("\n".join(text))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(markdown) + "\n")
    if args.plot and infos:
        plot(infos, args.plot)


if __name__ == "__main__":
    main()
