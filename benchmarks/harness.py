"""Shared benchmark harness: interleaved timing of two implementations, JSON records, the Markdown table.

Timings on a shared machine are noisy, so every comparison runs both implementations in the same
process, alternating (ours, upstream, ours, upstream, ...), and reports the median of each plus their
ratio (ours / upstream for throughputs: > 1 means we are faster). Each record is one JSON file under
the results folder; `write_table` turns a folder of records into the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Dense BF16 peaks (TFLOP/s) for the MFU column of GPU runs.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}


def common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="most timed repeats per implementation")
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="stop repeating a case once its timed runs took this long (at least one repeat each)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON records")
    parser.add_argument("--quick", action="store_true", help="tiny configs (the smoke test): checks plumbing only")
    return parser


def setup(args) -> torch.device:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict:
    """Where the numbers come from (named in every record, since they only compare within one machine)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Timing:
    """Seconds per call of each implementation (every repeat kept) and the work one call does."""

    ours: list[float] = field(default_factory=list)
    upstream: list[float] = field(default_factory=list)

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)

    @property
    def upstream_median(self) -> float:
        return statistics.median(self.upstream)


def interleaved(ours, upstream, *, device: torch.device, repeats: int, budget_s: float, warmup: int = 1) -> Timing:
    """Time `ours()` and `upstream()` alternately: `warmup` untimed calls each, then pairs of timed calls
    until `repeats` pairs or `budget_s` seconds (at least one pair). Alternating spreads the machine's
    load changes over both sides."""
    for _ in range(warmup):
        ours()
        upstream()
    timing, spent = Timing(), 0.0
    while len(timing.ours) < max(1, repeats):
        for fn, times in ((ours, timing.ours), (upstream, timing.upstream)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        spent += timing.ours[-1] + timing.upstream[-1]
        if spent >= budget_s:
            break
    return timing


@dataclass
class Record:
    """One benchmark case: `metrics` maps a name (e.g. "images/s") to {"ours", "upstream", "ratio"}."""

    benchmark: str
    case: str
    params: dict
    metrics: dict
    seconds: dict
    checks: dict = field(default_factory=dict)
    notes: str = ""
    machine: dict = field(default_factory=machine)

    def name(self) -> str:
        return f"{self.benchmark}__{self.case}".replace("/", "-").replace(" ", "_")


def throughput_metrics(timing: Timing, work: dict[str, float]) -> dict:
    """`work` = units per call (e.g. {"images/s": 8, "tokens/s": 160}); rates from the median seconds."""
    out = {}
    for name, units in work.items():
        ours, upstream = units / timing.ours_median, units / timing.upstream_median
        out[name] = {"ours": ours, "upstream": upstream, "ratio": ours / upstream}
    return out


def seconds_of(timing: Timing) -> dict:
    return {"ours": timing.ours, "upstream": timing.upstream,
            "ours_median": timing.ours_median, "upstream_median": timing.upstream_median}


def save(record: Record, out_dir: Path) -> Path:
    """Write the record as `<benchmark>__<case>.json` (atomically: a temporary file, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record.name()}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def save_and_report(records: list[Record], out_dir: Path) -> None:
    """Save each record and print its ratios and output checks (to stderr, next to the progress)."""
    import sys

    for record in records:
        save(record, out_dir)
        print(record.benchmark, record.case, {k: round(v["ratio"], 2) for k, v in record.metrics.items()},
              record.checks, file=sys.stderr)


def load_records(out_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(out_dir).glob("*.json")):
        record = json.loads(path.read_text())
        missing = {"benchmark", "case", "metrics"} - set(record)
        if missing:
            raise ValueError(f"{path}: not a benchmark record (missing {sorted(missing)})")
        records.append(record)
    return records


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(records: list[dict]) -> str:
    """One row per (case, metric): ours, upstream, ratio (ours/upstream; for s and MB lower is better), checks."""
    lines = ["| benchmark | case | metric | hf-vlm | upstream | ratio | checks |",
             "|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda r: (r["benchmark"], r["case"])):
        checks = ", ".join(f"{k}: {_fmt(v)}" for k, v in record.get("checks", {}).items()) or ""
        for metric, values in record["metrics"].items():
            lines.append(f"| {record['benchmark']} | {record['case']} | {metric} | {_fmt(values.get('ours'))} | "
                         f"{_fmt(values.get('upstream'))} | {_fmt(values.get('ratio'))} | {checks} |")
    return "\n".join(lines) + "\n"


def peak_memory_mb(step, device, repeats: int = 2) -> float:
    """Run `step` `repeats` times and return the peak memory in MiB: allocated GPU memory on CUDA,
    the process's peak RSS on CPU (measure each side in its own process)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        step()
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(argv: list[str], timeout: float = 900) -> dict:
    """Run `python argv...` in a fresh process that prints one JSON object as its last stdout line."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
