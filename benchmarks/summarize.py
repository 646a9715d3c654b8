"""Prints the benchmark summary table from a pytest-benchmark JSON file.

    python benchmarks/summarize.py build/bench.json [--markdown out.md] [--plot out.png]
"""
from __future__ import annotations

import argparse
import json

COLUMNS = [
    ("op", "op"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("device", "device"),
    ("mmfast ms", "mmfast_ms"),
    ("eager ms", "eager_ms"),
    ("speedup vs eager", "speedup_vs_eager"),
    ("sdpa ms", "sdpa_ms"),
    ("speedup vs sdpa", "speedup_vs_sdpa"),
    ("triton ms", "triton_ms"),
    ("speedup vs fla design", "speedup_vs_fla_design"),
    ("GB/s", "gbps"),
    ("% of floor", "pct_of_floor"),
    ("target", "target"),
    ("met", "target_met"),
]


def rows_from(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "op" in info:
            rows.append([_fmt(info.get(key)) for _, key in COLUMNS])
    return rows, data.get("machine_info", {}), data.get("commit_info", {})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def text_table(rows):
    headers = [title for title, _ in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(rows):
    headers = [title for title, _ in COLUMNS]
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        print(f"summarize: matplotlib is not installed, {path} not written")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r[0].split('.')[-1]}  {r[1]}" for r in rows if r[6]]
    speedups = [float(r[6]) for r in rows if r[6]]
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(labels) + 1.5))
    ax.barh(labels, speedups, color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of mmfast over the eager LinFusion formulation (x)")
    ax.set_title(f"linear attention, {rows[0][3]}" if rows else "linear attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args()
    rows, machine, commit = rows_from(args.json)
    print(text_table(rows))
    if args.markdown:
        header = f"Commit {commit.get('id', '?')[:10]}, {machine.get('cpu', {}).get('brand_raw', '')}\n\n"
        with open(args.markdown, "w") as f:
            f.write(header + markdown_table(rows) + "\n")
    if args.plot and rows:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
