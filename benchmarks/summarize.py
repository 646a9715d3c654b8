"""Prints the benchmark summary table from a pytest-benchmark JSON file, for any op family.

    python benchmarks/summarize.py build/bench.json [--markdown out.md] [--plot out.png]
    python benchmarks/summarize.py build/bench.rows.jsonl ...   (MMFAST_BENCH_ROWS, conftest.py)

A row is every benchmark whose extra_info was written by _utils.record_metrics (it has
"op"). Baseline columns are those the rows recorded (`<name>_ms`, `speedup_vs_<name>`).
"""
from __future__ import annotations

import argparse
import json

LEADING = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("device", "device"), ("mmfast ms", "mmfast_ms")]
TRAILING = [("throughput", "throughput"), ("GB/s", "gbps"), ("TFLOP/s", "tflops"), ("% of floor", "pct_of_floor"), ("target", "target"),
            ("met", "target_met")]


def load(path):
    """The rows of a pytest-benchmark JSON file, or of a MMFAST_BENCH_ROWS file (.jsonl: one row a
    line, written as each benchmark ended; no machine or commit info)."""
    if str(path).endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [row for row in rows if "op" in row], {}, {}
    with open(path) as f:
        data = json.load(f)
    infos = [bench.get("extra_info", {}) for bench in data["benchmarks"]]
    return [info for info in infos if "op" in info], data.get("machine_info", {}), data.get("commit_info", {})


def columns_for(infos):
    """The leading columns, one (ms, speedup) pair per baseline in first-seen order, the trailing ones."""
    baselines = []
    for info in infos:
        for key in info:
            if key.startswith("speedup_vs_") and key[len("speedup_vs_"):] not in baselines:
                baselines.append(key[len("speedup_vs_"):])
    middle = []
    for name in baselines:
        middle += [(f"{name} ms", f"{name}_ms"), (f"speedup vs {name}", f"speedup_vs_{name}")]
    return LEADING + middle + TRAILING


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def rows_for(infos, columns):
    return [[_fmt(info.get(key)) for _, key in columns] for info in infos]


def text_table(rows, columns):
    headers = [title for title, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(rows, columns):
    headers = [title for title, _ in columns]
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot(infos, path):
    """One bar per row: the speedup over the row's primary baseline."""
    try:
        import matplotlib
    except ImportError:
        print(f"summarize: matplotlib is not installed, {path} not written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{info['op']}  {info['shape']}  (vs {info['baseline']})", info[f"speedup_vs_{info['baseline']}"])
            for info in infos if "baseline" in info]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(bars) + 1.5))
    ax.barh([label for label, _ in bars], [value for _, value in bars], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of mmfast over the row's primary baseline, measured in the same run (x)")
    families = sorted({info["op"].split(".")[0] for info in infos})
    ax.set_title(f"mmfast: {', '.join(families)} on {infos[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args()
    infos, machine, commit = load(args.json)
    columns = columns_for(infos)
    rows = rows_for(infos, columns)
    print(text_table(rows, columns))
    if args.markdown:
        header = f"Commit {commit.get('id', '?')[:10]}, {machine.get('cpu', {}).get('brand_raw', '')}\n\n"
        with open(args.markdown, "w") as f:
            f.write(header + markdown_table(rows, columns) + "\n")
    if args.plot and infos:
        plot(infos, args.plot)


if __name__ == "__main__":
    main()
