"""Training throughput of every SAE architecture against its roofline and a dense TopK, and
the loader alone against the fastest consumer.

    python bench/train_throughput.py                 # CPU preset (d=128, M=4096, k=32, batch 4096)
    python bench/train_throughput.py --preset h200   # GPU, GPT-2 scale (d=768, M=24576, k=32, batch 16384, bf16)

Per architecture (every registered one at total width M; Switch with M/N = M/32 latents per
expert; Scale at (N, e) with e*M/N equal to Switch's expert width, the FLOP-matched
(64, 2) and (128, 4) at GPT-2 scale) one full training step is timed: the trainer's own
`saepipe.train.train_step` (forward under bf16 autocast on GPU, fp32 on CPU; backward;
decoder hooks; Adam, fused on CUDA), median of --steps after --warmup, on one fixed batch.

- roofline: tokens/s if a step cost 3x the forward FLOPs/token of docs/reference.md §1
  (`config.flops_per_token()`) at the device's dense matmul peak, measured in the same run
  with a large torch.mm (fp32 on CPU, bf16 on GPU). References are charged their library
  twin's FLOPs (same model, more work), so their % shows the waste. The TopK family's
  sparse encoder backward skips most of the 2x-forward backward pass, so its % can
  approach or pass 100.
- torch.compile is not offered by the trainer: on this CPU it did not speed up TopK
  (256 -> 293 ms/step, d=128, M=4096, batch 4096, 1 thread) and it cannot trace the fp32
  grouped_mm of Switch/Scale (its meta kernel demands bf16); measure it here on a GPU
  before adding it.
- references (bench/_common.py): `dense_topk` (dense encoder, dense [B, M] code, dense
  decode: the straightforward SAE) and `reference_switch` (every expert's encoder, masked).
- peak memory: CUDA max_memory_allocated; CPU: growth of the process RSS (sampled every
  2 ms) while that architecture is built and trained, after glibc's malloc_trim has
  handed back what earlier ones freed.
- loader: ShardStream over real Zarr shards written here (random fp16, --loader-shards
  shards of --shard-tokens tokens), batches delivered on the device per second, streaming
  (prefetch 0 and 1) and from the device cache; compared with the fastest architecture's
  consumption. Skipped with a message when zarr 3 is missing.

Writes bench/results/train_throughput-<date>-<device>.{json,md} (or --out-dir) with the
table and the exact command. Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _common import DenseTopK, ReferenceSwitch, routing_fields, time_steps, topk_arch  # noqa: E402

from saepipe.saes import ARCHITECTURES, build_sae, config_from_dict  # noqa: E402

PRESETS = {
    # smoke test only (seconds)
    "tiny": dict(
        d=32,
        M=512,
        k=8,
        batch=512,
        switch_experts=8,
        experts_e=[(8, 2)],
        steps=2,
        warmup=1,
        loader_shards=2,
        shard_tokens=4096,
        matmul_n=512,
    ),
    "cpu": dict(
        d=128,
        M=4096,
        k=32,
        batch=4096,
        switch_experts=16,
        experts_e=[(32, 2), (64, 4)],
        steps=3,
        warmup=1,
        loader_shards=4,
        shard_tokens=65536,
        matmul_n=2048,
    ),
    "h200": dict(
        d=768,
        M=24576,
        k=32,
        batch=16384,
        switch_experts=32,
        experts_e=[(64, 2), (128, 4)],
        steps=20,
        warmup=5,
        loader_shards=4,
        shard_tokens=131072,
        matmul_n=8192,
    ),
}
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}  # dense, SXM datasheets


def arch_configs(p: dict) -> dict[str, dict]:
    """Name -> SAE config dict: every registered architecture; routed ones with the preset's N,
    those with a configurable experts per token (Scale) once per (N, e) of ``p["experts_e"]``."""
    base = {"d_in": p["d"], "width": p["M"], "k": p["k"]}
    out = {}
    for arch in ARCHITECTURES:
        routed, per_token = routing_fields(arch)
        if routed and not per_token:
            out[f"{arch} N={p['switch_experts']}"] = {**base, "arch": arch, "n_experts": p["switch_experts"]}
        elif routed:
            for N, e in p["experts_e"]:
                out[f"{arch} N={N} e={e}"] = {**base, "arch": arch, "n_experts": N, "active_experts": e}
        else:
            out[arch] = {**base, "arch": arch}
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of `reps` back-to-back n x n x n torch.mm in `dtype` on `device` (after one warm-up)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return reps * 2 * n**3 / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory (MB) inside the block: CUDA max allocated, else RSS growth sampled every ms."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            _malloc_trim()
            self.base = self.peak = _rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif hasattr(self, "thread"):
            self.stop.set()
            self.thread.join()
            self.mb = (max(self.peak, _rss()) - self.base) / 2**20


def _malloc_trim() -> None:
    """Return the C heap's free pages to the OS (glibc), so that RSS growth means new memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the growth is then a lower bound
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_archs(
    p: dict, device: torch.device, autocast: torch.dtype | None, peak_flops: float, steps: int, warmup: int
) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(p["batch"], p["d"], device=device)
    configs = arch_configs(p)
    models = {name: (lambda cfg=cfg: build_sae(config_from_dict(cfg)), cfg) for name, cfg in configs.items()}
    switch = next(c for c in configs.values() if routing_fields(c["arch"]) == (True, False))
    models["dense_topk (reference)"] = (lambda: DenseTopK(p["d"], p["M"], p["k"]), configs[topk_arch()])
    models["reference_switch (reference)"] = (
        lambda: ReferenceSwitch(p["d"], p["M"], p["k"], switch["n_experts"]),
        switch,
    )
    rows = []
    for name, (make, cfg) in models.items():
        with PeakMemory(device) as mem:
            model = make().to(device)
            sec = time_steps(model, x, steps, warmup, autocast)
            del model
        flops = config_from_dict(cfg).flops_per_token()
        tokens_per_s = p["batch"] / sec
        rows.append(
            {
                "arch": name,
                "batch": p["batch"],
                "ms_per_step": 1e3 * sec,
                "tokens_per_s": tokens_per_s,
                "flops_per_token_fwd": flops,
                "roofline_tokens_per_s": peak_flops / (3 * flops),
                "pct_of_roofline": 100 * tokens_per_s * 3 * flops / peak_flops,
                "peak_mem_mb": mem.mb,
            }
        )
        print(
            f"  {name:<30}{1e3 * sec:>9.1f} ms/step {tokens_per_s:>12,.0f} tok/s "
            f"{rows[-1]['pct_of_roofline']:>6.1f}% of roofline",
            flush=True,
        )
    dense = next(r for r in rows if r["arch"].startswith("dense_topk"))["tokens_per_s"]
    for r in rows:
        r["ratio_to_dense_topk"] = r["tokens_per_s"] / dense
    return rows


def bench_loader(p: dict, device: torch.device, consumer_tokens_per_s: float) -> dict:
    """Loader rates (tokens/s delivered on `device`) from Zarr shards written to a temp dir."""
    try:
        from saepipe.data.loader import ShardStream
        from saepipe.data.shards import write_shard
    except ImportError as err:
        print(f"loader part skipped: {err} (it needs zarr 3: pip install -c constraints.txt -e .)")
        return {"skipped": str(err)}
    n, d, B = p["shard_tokens"], p["d"], p["batch"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="saepipe-loader-bench-") as tmp:
        paths = []
        for i in range(p["loader_shards"]):
            acts = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
            path = Path(tmp) / f"{i}.zarr"
            write_shard(
                path,
                acts,
                np.zeros(n, np.int32),
                np.arange(n, dtype=np.int32) % 1024,
                {"model": "bench", "hook": "bench", "dtype": "float16", "d_in": d, "token_count": n, "mean_norm": 1.0},
            )
            paths.append(str(path))
        total = 2 * n * len(paths)  # two epochs
        rates = {}
        for mode, kw in {
            "stream, prefetch 0": dict(prefetch=0),
            "stream, prefetch 1": dict(prefetch=1),
            "device cache": dict(cache_bytes=float("inf")),
        }.items():
            stream = ShardStream(paths, B, total, seed=0, buffer_shards=2, device=device, **kw)
            if stream.cached:
                stream.load_cache()  # loaded once per training run: not part of the rate
            _sync(device)
            t0 = time.perf_counter()
            for _batch in stream:
                pass
            _sync(device)
            rates[mode] = len(stream) * B / (time.perf_counter() - t0)
            print(
                f"  loader {mode:<22}{rates[mode]:>14,.0f} tok/s = "
                f"{rates[mode] / consumer_tokens_per_s:.1f}x the fastest architecture",
                flush=True,
            )
    return {
        "shards": len(paths),
        "shard_tokens": n,
        "d": d,
        "batch": B,
        "tokens": total,
        "tokens_per_s": rates,
        "fastest_consumer_tokens_per_s": consumer_tokens_per_s,
        "ratio_to_fastest_consumer": {m: r / consumer_tokens_per_s for m, r in rates.items()},
    }


def markdown(result: dict) -> str:
    dev, mem = result["device"], "GPU max allocated" if result["device_type"] == "cuda" else "RSS growth"
    lines = [
        f"# Training throughput, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device: {dev} ({result['device_type']}, torch {result['torch']}, {result['threads']} threads, "
        f"{result['cpu_count']} cores, load average {result['load_average_at_start']} at start); "
        f"precision {result['precision']}; dense matmul peak measured {result['peak_tflops']:.3g} TFLOP/s "
        f"({result['peak_dtype']} torch.mm) = the roofline"
        + (f"; datasheet {result['nominal_tflops']} TFLOP/s" if result.get("nominal_tflops") else "")
        + ".",
        f"Preset {result['preset_name']}: {result['preset']}.",
        "",
        f"| architecture | device | batch | tokens/s | % of roofline | ratio to dense TopK | peak memory ({mem}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f} MB"
        lines.append(
            f"| {r['arch']} | {result['device_type']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
            f"{r['pct_of_roofline']:.1f} | {r['ratio_to_dense_topk']:.2f} | {peak} |"
        )
    loader = result["loader"]
    lines.append("")
    if "skipped" in loader:
        lines.append(f"Loader: skipped ({loader['skipped']}).")
    else:
        lines += [
            f"Loader alone ({loader['shards']} Zarr shards x {loader['shard_tokens']:,} tokens, d={loader['d']}, "
            f"batch {loader['batch']}, {loader['tokens']:,} tokens):",
            "",
            "| loader | tokens/s | x fastest architecture |",
            "|---|---|---|",
        ]
        for mode, rate in loader["tokens_per_s"].items():
            lines.append(f"| {mode} | {rate:,.0f} | {loader['ratio_to_fastest_consumer'][mode]:.1f} |")
        lines.append(f"\nFastest architecture: {loader['fastest_consumer_tokens_per_s']:,.0f} tokens/s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="timed steps per architecture (default: the preset's)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: the preset's)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, all cores)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p, device = PRESETS[args.preset], torch.device(args.device)
    gpu = device.type == "cuda"
    autocast = torch.bfloat16 if gpu else None
    peak_dtype = torch.bfloat16 if gpu else torch.float32
    dev_name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine())
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    print(
        f"preset {args.preset} {p} on {dev_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {load}"
    )
    peak = matmul_peak(device, peak_dtype, p["matmul_n"], reps=50 if gpu else 5)
    print(f"  dense {str(peak_dtype).removeprefix('torch.')} matmul peak {peak / 1e12:.3g} TFLOP/s")
    rows = bench_archs(p, device, autocast, peak, args.steps or p["steps"], args.warmup or p["warmup"])
    fastest = max(r["tokens_per_s"] for r in rows)
    result = {
        "command": "python "
        + " ".join(
            [sys.argv[0] if argv is None else "bench/train_throughput.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": dev_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "precision": "bf16 autocast" if autocast else "fp32",
        "preset_name": args.preset,
        "preset": p,
        "peak_dtype": str(peak_dtype).removeprefix("torch."),
        "peak_tflops": peak / 1e12,
        "nominal_tflops": next((v for k, v in NOMINAL_BF16_TFLOPS.items() if gpu and k in dev_name), None),
        "rows": rows,
        "loader": bench_loader(p, device, fastest),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"train_throughput-{dt.date.today()}-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"written {stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
