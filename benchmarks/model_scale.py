"""Ladder 6, model scale: Llama-shaped bf16 seed checkpoints of 0.5 B and 2 B parameters (a base and two
fine-tune-like variants each), merged by the `recipe` space and by the `merge` space with task arithmetic, TIES
and DARE-TIES.

For each size, two processes play the two roles of a distributed run, with the functions a run uses:
- the driver: the space over the seed folders left on disk, M2N2 asking and being told 200 candidates (its
  crossovers need the recipe's Gram matrices, one streamed pass over the seeds), then the best model streamed to a
  safetensors file. Its peak RSS should not grow with the model.
- a worker: the seeds resident in bf16, one set of buffers, each method's candidate written into them. Per
  method: seconds per candidate against a plain copy of the same bytes (seed -> buffers, `copy_`) timed in the
  same process, and the process's peak RSS against the seeds + 1.2 × one model.

`--device cuda` runs the worker part on a GPU with seeds made in GPU memory (`--gpu-shape 7b` by default), no
files: the time to materialise a 7 B-sized candidate, against a device copy of the same bytes.

    python benchmarks/model_scale.py                      # 0.5b and 2b on the CPU (writes ~15 GB of checkpoints)
    python benchmarks/model_scale.py --sizes 0.5b --quick
    python benchmarks/model_scale.py --device cuda        # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, intermediate, layers (vocabulary 32,000, untied head), like Llama
    "tiny": (64, 128, 2),  # a smoke test of the script itself
    "0.5b": (1536, 4096, 16),
    "2b": (2560, 6912, 24),
    "7b": (4096, 11008, 32),
}
VOCAB = 32_000
METHODS = {
    "recipe (linear)": ({"name": "recipe", "blocks": "layer"}, None),
    "task_arithmetic": ({"name": "merge", "methods": ["task_arithmetic"]}, None),
    "ties": ({"name": "merge", "methods": ["ties"], "fixed": {"density": 0.2}}, None),
    "dare_ties": ({"name": "merge", "methods": ["dare"], "fixed": {"drop_rate": 0.8, "consensus": "elect"}}, None),
}


def llama_tensors(size: str) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, layers = SHAPES[size]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden))]
        names += [(p + "mlp.down_proj.weight", (hidden, inter))]
        names += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]
    return names


def seed_tensor(shape: tuple[int, ...], seed: int, variant: int, device: str = "cpu") -> torch.Tensor:
    """The base (variant 0) or a fine-tune-like variant: the base plus a small random task vector."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(shape, generator=gen, device=device) * 0.02
    if variant:
        delta = torch.Generator(device=device).manual_seed(seed * 7 + variant)
        base += torch.randn(shape, generator=delta, device=device) * 0.002
    return base.to(torch.bfloat16)


def write_seeds(size: str, root: Path) -> list[Path]:
    """Three HF-style folders (sharded at 1 GiB, with an index), written once and reused."""
    from evomerge.weights.checkpoint import write_checkpoint

    folders = [root / f"llama-{size}-seed{k}" for k in range(3)]
    tensors = llama_tensors(size)
    for variant, folder in enumerate(folders):
        if folder.exists():
            continue
        entries = [(n, s, torch.bfloat16) for n, s in tensors]
        stream = ((n, seed_tensor(s, i, variant)) for i, (n, s) in enumerate(tensors))
        hidden, inter, layers = SHAPES[size]
        config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter}
        config |= {"num_hidden_layers": layers, "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
        write_checkpoint(
            folder, entries, stream, max_shard_bytes=2**30, extra_files={"config.json": json.dumps(config)}
        )
    return folders


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set; not ru_maxrss, which a process started by
    fork and exec inherits from its parent."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def build_space(method: str, seeds: Any) -> Any:
    from evomerge.space import SPACES

    options, _ = METHODS[method]
    return SPACES.build(SPACES.resolve(dict(options), "space"), layout=seeds.layout, seeds=seeds)


def candidate(space: Any, rng: np.random.Generator) -> np.ndarray:
    if hasattr(space, "n_seeds"):  # a recipe: a random convex-ish combination per block
        return rng.dirichlet(np.ones(space.n_seeds), space.n_blocks).ravel().astype(np.float32)
    return rng.uniform(0.2, 0.8, space.dim).astype(np.float32)


def driver_role(folders: list[Path], out: Path, evaluations: int) -> dict[str, Any]:
    """What a distributed run's driver holds: the lazy space, M2N2's archive of recipes, the best model streamed."""
    from evomerge.evaluate.base import EvalResult
    from evomerge.search import STRATEGIES
    from evomerge.search.base import Candidate
    from evomerge.weights.io import write_model
    from evomerge.weights.seed_models import SeedModels

    start = time.perf_counter()
    seeds = SeedModels.from_files(folders)
    space = build_space("recipe (linear)", seeds)
    strategy = STRATEGIES.build(STRATEGIES.resolve({"name": "m2n2", "population": 20}, "strategy"), space=space, seed=0)
    rng = np.random.default_rng(0)
    for cid in range(evaluations):
        proposal = strategy.ask()
        scores = rng.random(64).astype(np.float32)
        result = EvalResult({"accuracy": float(scores.mean())}, scores)
        strategy.tell(Candidate(cid, proposal.genome, proposal.meta), result)
    searched = time.perf_counter() - start
    best = strategy.best()[0]
    write_model(out / "best.safetensors", space, best, seeds.dtypes)
    return {
        "driver_peak_rss_mb": round(rss_mb(), 1),
        "driver_search_s": round(searched, 1),
        "best_written_s": round(time.perf_counter() - start - searched, 1),
        "strategy_state_kb": round(
            sum(np.asarray(g).nbytes for g in strategy.state_dict().get("genomes", [])) / 1e3, 1
        ),
    }


def timed(fn: Any, repeat: int, device: torch.device) -> float:
    """Median seconds of `fn` over `repeat` runs after one warm-up, synchronised on a GPU."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def worker_role(seeds: Any, methods: list[str], repeat: int) -> dict[str, Any]:
    """A worker's life: seeds resident, one set of buffers, candidates written into them; each timed against a plain
    copy of the same bytes (the first seed into the buffers) in this process."""
    device = seeds.device
    buffers = seeds.allocate()
    model_bytes = seeds.nbytes()

    def plain_copy() -> None:
        for name, buffer in buffers.items():
            buffer.copy_(seeds.tensor(0, name))

    copy_s = timed(plain_copy, repeat, device)
    rows = []
    rng = np.random.default_rng(0)
    for method in methods:
        space = build_space(method, seeds)
        genome = candidate(space, rng)
        before = rss_mb("VmRSS") if device.type == "cpu" else 0.0
        if device.type == "cpu":
            reset_peak()
        seconds = timed(lambda: space.write(genome, buffers), repeat, device)  # noqa: B023 - used at once
        rows.append(
            {
                "method": method,
                "seconds": round(seconds, 4),
                "gb_per_s": round(model_bytes / seconds / 1e9, 2),
                "share_of_copy_rate": round(copy_s / seconds, 3),
                **(
                    {"peak_rss_mb": round(rss_mb(), 1), "rss_growth_mb": round(rss_mb() - before, 1)}
                    if device.type == "cpu"
                    else {}
                ),
            }
        )
    return {
        "model_gb": round(model_bytes / 1e9, 3),
        "copy_s": round(copy_s, 4),
        "copy_gb_per_s": round(model_bytes / copy_s / 1e9, 2),
        "methods": rows,
    }


def cpu_worker(folders: list[Path], methods: list[str], repeat: int) -> dict[str, Any]:
    from evomerge.weights.seed_models import SeedModels

    baseline = rss_mb("VmRSS")
    lazy = SeedModels.from_files(folders)
    seeds = lazy.resident("cpu")
    loaded_peak = rss_mb()
    result = worker_role(seeds, methods, repeat)
    model_mb = seeds.nbytes() / 2**20
    result |= {
        "worker_rss_mb": round(rss_mb("VmRSS"), 1),
        "worker_peak_rss_mb": round(max([loaded_peak] + [r["peak_rss_mb"] for r in result["methods"]]), 1),
        "worker_rss_before_seeds_mb": round(baseline, 1),
        "goal_mb": round(len(seeds) * model_mb + 1.2 * model_mb, 1),
    }
    return result


def gpu_worker(shape: str, methods: list[str], repeat: int, chunks: list[int]) -> dict[str, Any]:
    from evomerge.merge.base import SUM_CHUNK
    from evomerge.weights.layout import Layout
    from evomerge.weights.seed_models import SeedModels

    tensors = llama_tensors(shape)
    layout = Layout(tuple(n for n, _ in tensors), tuple(s for _, s in tensors))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script out
    models = [{n: seed_tensor(s, i, variant, device) for i, (n, s) in enumerate(tensors)} for variant in range(3)]
    seeds = SeedModels.from_tensors(models, layout)
    result = worker_role(seeds, methods, repeat)
    linear = [m for m in methods if m in ("recipe (linear)", "task_arithmetic")]
    default = SUM_CHUNK["cuda"]
    result["chunk_sweep"] = {}
    for chunk in chunks:  # the weighted sums' chunk (elements of float32 partial sums kept in L2)
        SUM_CHUNK["cuda"] = chunk
        result["chunk_sweep"][str(chunk)] = worker_role(seeds, linear, repeat)["methods"]
    SUM_CHUNK["cuda"] = default
    result |= {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "none",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device == "cuda" else None,
        "seeds_gb": round(len(seeds) * seeds.nbytes() / 1e9, 1),
    }
    return result


def run_role(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    folders = [Path(p) for p in args.folders]
    if args.role == "driver":
        result = driver_role(folders, Path(args.out), args.evaluations)
    else:
        result = cpu_worker(folders, args.methods, args.repeat)
    print(json.dumps(result))


def in_subprocess(role: str, folders: list[Path], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Each role in a fresh process, so its peak RSS is its own."""
    command = [sys.executable, __file__, "--role", role, "--out", str(out), "--threads", str(args.threads)]
    command += ["--repeat", str(args.repeat), "--evaluations", str(args.evaluations), "--folders", *map(str, folders)]
    command += ["--methods", *args.methods]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{role} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "2b"], choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpu-shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--gpu-chunks", nargs="*", type=int, default=[], help="weighted-sum chunk sizes to compare")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "evomerge" / "model_scale"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="one repeat, 20 evaluations")
    parser.add_argument("--role", choices=["driver", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--folders", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_role(args)
        return
    if args.quick:
        args.repeat, args.evaluations = 1, 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if args.device == "cuda":
        result = {
            "machine": machine,
            "gpu": gpu_worker(args.gpu_shape, args.methods, args.repeat, args.gpu_chunks),
            "shape": args.gpu_shape,
        }
        (out / "model_scale_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    rows = []
    for size in args.sizes:
        start = time.perf_counter()
        folders = write_seeds(size, Path(args.cache))
        params = sum(math.prod(s) for _, s in llama_tensors(size))
        print(
            f"{size}: {params / 1e9:.2f} B parameters, seeds ready in {time.perf_counter() - start:.0f} s", flush=True
        )
        driver = in_subprocess("driver", folders, args, Path(args.cache))
        worker = in_subprocess("worker", folders, args, out)
        rows.append({"size": size, "parameters": params, **driver, **worker})
        print(json.dumps(rows[-1], indent=2), flush=True)
    (Path(args.cache) / "best.safetensors").unlink(missing_ok=True)
    result = {"machine": machine, "threads": args.threads, "rows": rows, "command": " ".join(sys.argv)}
    (out / "model_scale.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
