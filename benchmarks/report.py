"""Turn a folder of benchmark records (JSON) into its README.md (the Markdown table, and the loader workers per GPU
when the folder has the loader and FLOPs records) and plot.png.

    python -m benchmarks.report benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import harness

PLOT_NAME = "plot.png"


def write_readme(folder: Path, records: list[dict], header: str = "") -> Path:
    machines = {(r["machine"].get("gpu") or r["machine"].get("cpu"), r["machine"].get("cpu_count"))
                for r in records if r.get("machine")}
    loads = [r["machine"]["load_average"][0] for r in records if r.get("machine", {}).get("load_average")]
    lines = [f"# Benchmark results: {folder.name}", ""]
    if header:
        lines += [header.strip(), ""]
    lines += ["Machine: " + "; ".join(f"{name} ({cores} cores)" for name, cores in sorted(machines, key=str)), ""]
    if loads:
        lines += [f"1-minute load average seen while measuring: {min(loads):.1f} to {max(loads):.1f}.", ""]
    lines += ["ratio = hf-vlm / upstream: above 1 is faster for throughputs (/s); below 1 is better for seconds and "
              "memory. Medians of interleaved repeats; see the JSON files for every repeat.", "",
              harness.markdown_table(records)]
    if any(r["benchmark"] == "loader" for r in records):
        from benchmarks import bench_loader

        workers = bench_loader.workers_section(records)
        if workers:
            lines += ["", workers]
    if (folder / PLOT_NAME).is_file():
        lines += ["", f"![tokens/s vs caption length]({PLOT_NAME})", ""]
    path = folder / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def write_plot(folder: Path, records: list[dict]) -> Path | None:
    """CoCa caption tokens/s vs new tokens, one line per (implementation, strategy, batch)."""
    generation = [r for r in records if r["benchmark"] == "coca_generate"]
    if not generation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    for r in generation:
        p = r["params"]
        for side in ("ours", "upstream"):
            series.setdefault((side, p["strategy"], p["batch"]), []).append(
                (p["new_tokens"], r["metrics"]["tokens/s"][side]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (side, strategy, batch), points in sorted(series.items()):
        points.sort()
        label = f"{'hf-vlm (KV cache)' if side == 'ours' else 'open_clip (no cache)'} {strategy} batch {batch}"
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
                linestyle="-" if side == "ours" else "--", label=label)
    ax.set_xlabel("new tokens per caption")
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"CoCa caption generation ({generation[0]['params']['model']}, {generation[0]['params']['device']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / PLOT_NAME
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=harness.RESULTS_DIR / "cpu")
    parser.add_argument("--header", default="", help="text put above the table (how the numbers were made)")
    args = parser.parse_args(argv)
    records = harness.load_records(args.folder)
    if not records:
        print(f"no benchmark records (*.json) in {args.folder}", file=sys.stderr)
        return 1
    write_plot(args.folder, records)
    print(write_readme(args.folder, records, args.header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
