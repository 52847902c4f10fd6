"""Packs (``train.pack: K``): bytes read and training tokens/s per SAE for K = 1, 2, 4, 8, side by side.

    python bench/pack_throughput.py --threads 1        # CPU preset (d=128, M=4096, k=32, batch 4096)
    python bench/pack_throughput.py --preset h200      # GPU (d=768, M=24576, k=32, batch 16384, bf16)

Real Zarr shards of random fp16 activations are written to a temp dir (--preset's shard count
and size), then `saepipe.train.train_pack` trains a pack of K TopK SAEs on them for every K
(--ks), each over the same tokens (same batch stream: seed 0), streaming from the shards
(``device_cache_gb`` 0, so every pack really reads them; prefetch 1, as the pipeline). The
pack is one TopK SAE at K learning rates (``--vary lr``: the members differ only in a
member field, so every SAE does the same work and tokens/s per SAE compare across K);
``--vary k`` gives them K different k instead (a sweep group's k axis). An untimed pack of one
over two batches runs first (allocator, kernels, threads warm-up). Per K:

- wall_s: the whole `train_pack` call, what one pipeline train job costs (building the SAEs,
  every step, saving each SAE; for K > 1 also the final pack checkpoint);
  loop_s: start to the last step only (the last log row's ``elapsed_s``);
- tokens/s per SAE = tokens x K / wall_s (and / loop_s); speed-up per SAE = that / K=1's;
- bytes read per SAE = PackRun.bytes_read / K (the pack reads the stream once), and its
  ratio to K=1's (1/K whenever the stream is the same);
- peak GPU memory (CUDA max_memory_allocated; n/a on the CPU).

Precision: TrainConfig ``precision: auto`` (bf16 autocast on CUDA, fp32 on the CPU), batch
size from the preset. Writes bench/results/pack_throughput-<date>-<device>.{json,md} (or
--out-dir) with the date, the machine and the exact command. Figures only: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _common import topk_arch  # noqa: E402

from saepipe.data.shards import write_shard  # noqa: E402
from saepipe.train import Member, TrainConfig, train_pack  # noqa: E402

PRESETS = {
    # CI smoke test (seconds): 16 steps of 512 per K
    "tiny": dict(d=32, M=512, k=8, batch=512, shards=2, shard_tokens=4096, tokens=8192, lr=5e-4),
    # train_throughput's cpu preset (d, M, k, batch) and loader shards; 64 steps per K, one epoch
    "cpu": dict(d=128, M=4096, k=32, batch=4096, shards=4, shard_tokens=65536, tokens=262144, lr=5e-4),
    # GPT-2 scale: 128 steps per K, 4 epochs over 4 shards (805 MB of fp16, re-read every epoch)
    "h200": dict(d=768, M=24576, k=32, batch=16384, shards=4, shard_tokens=131072, tokens=2097152, lr=2e-4),
}
KS = (1, 2, 4, 8)


def write_shards(root: Path, p: dict, seed: int = 0) -> list[str]:
    """``p["shards"]`` Zarr shards of ``p["shard_tokens"]`` N(0, 1) rows (fp16, d = ``p["d"]``)."""
    rng, paths, n, d = np.random.default_rng(seed), [], p["shard_tokens"], p["d"]
    for i in range(p["shards"]):
        acts = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
        norm = float(np.linalg.norm(acts.astype(np.float32), axis=1).mean())
        meta = {"model": "bench", "hook": "bench", "dtype": "float16", "d_in": d, "token_count": n, "mean_norm": norm}
        path = root / f"{i}.zarr"
        write_shard(path, acts, np.zeros(n, np.int32), np.arange(n, dtype=np.int32) % 1024, meta)
        paths.append(str(path))
    return paths


def members(p: dict, K: int, vary: str, cfg: TrainConfig, root: Path) -> list[Member]:
    """K TopK SAEs of one group: the same SAE at K learning rates (``lr``) or K values of k (``k``)."""
    out = []
    for i in range(K):
        k = p["k"] if vary == "lr" or i == 0 else max(1, round(p["k"] * 2 ** ((-1) ** i * ((i + 1) // 2))))
        lr = p["lr"] * 2 ** (i / 3) if vary == "lr" else p["lr"]
        fields = {"arch": topk_arch(), "width": p["M"], "k": k}
        out.append(Member(fields, replace(cfg, lr=lr), root / f"m{i}"))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_pack(p: dict, K: int, vary: str, cfg: TrainConfig, shards: list[str], root: Path) -> dict:
    """One pack of K over ``cfg.tokens``: timings, bytes read and each member's final row."""
    device = torch.device(cfg.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    pack = members(p, K, vary, cfg, root)
    _sync(device)
    t0 = time.perf_counter()
    run = train_pack(pack, shards, name=f"pack{K}")
    _sync(device)
    wall = time.perf_counter() - t0
    loop = max(r["elapsed_s"] for r in run.rows)
    tokens = run.steps * p["batch"]
    row = {
        "K": K,
        "members": [{"k": m.sae_fields["k"], "lr": m.cfg.lr, "final_loss": r["loss"]} for m, r in zip(pack, run.rows)],
        "steps": run.steps,
        "tokens": tokens,
        "wall_s": wall,
        "loop_s": loop,
        "tokens_per_s_per_sae": tokens * K / wall,
        "loop_tokens_per_s_per_sae": tokens * K / loop,
        "bytes_read": run.bytes_read,
        "shard_bytes": run.shard_bytes,
        "bytes_read_per_sae": run.bytes_read / K,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    shutil.rmtree(root, ignore_errors=True)  # the SAEs themselves are not needed
    return row


def machine(device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if gpu else None,
        "threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def markdown(result: dict) -> str:
    m, p = result["machine"], result["preset"]
    dev = m["gpu"] or m["processor"]
    lines = [
        f"# Pack throughput, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device: {dev} ({result['device_type']}, torch {m['torch']}, {m['threads']} threads, {m['cores']} cores, "
        f"load average {m['load_average_at_start']} at start); precision {result['precision']}.",
        f"Preset {result['preset_name']}: TopK d={p['d']}, M={p['M']}, k={p['k']}, batch {p['batch']}; "
        f"{result['tokens']:,} tokens per SAE; {p['shards']} Zarr shards x {p['shard_tokens']:,} tokens "
        f"({result['shard_bytes']:,} bytes), streamed (device cache off, prefetch 1); members vary in "
        f"{result['vary']}.",
        "",
        "| K | wall s | loop s | tokens/s per SAE | speed-up per SAE | loop tokens/s per SAE | bytes read | "
        "bytes read per SAE | vs K=1 | peak GPU memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f} MB"
        lines.append(
            f"| {r['K']} | {r['wall_s']:.2f} | {r['loop_s']:.2f} | {r['tokens_per_s_per_sae']:,.0f} | "
            f"{r['speedup_per_sae']:.2f} | {r['loop_tokens_per_s_per_sae']:,.0f} | {r['bytes_read']:,} | "
            f"{r['bytes_read_per_sae']:,.0f} | {r['bytes_per_sae_vs_k1']:.3f} | {peak} |"
        )
    lines += [
        "",
        "wall: the whole train_pack call (build, steps, saves; K > 1 also the final pack checkpoint); "
        "loop: up to the last step. Speed-up per SAE: tokens/s per SAE over K=1's (wall).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS), help="pack sizes (default 1 2 4 8)")
    ap.add_argument("--tokens", type=int, help="training tokens per SAE (default: the preset's)")
    ap.add_argument("--vary", choices=("lr", "k"), default="lr", help="what differs between the members")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, all cores)")
    ap.add_argument("--tmp-dir", type=Path, help="where the shards are written (default: the system's temp dir)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p, device = dict(PRESETS[args.preset]), torch.device(args.device)
    if args.tokens:
        p["tokens"] = args.tokens
    ks = sorted(set(args.ks))
    if ks[0] != 1:
        ks.insert(0, 1)  # the reference of every ratio
    cfg = TrainConfig(
        tokens=p["tokens"],
        batch_size=p["batch"],
        warmup_steps=1,
        log_every=25,
        seed=0,
        device=str(device),
        precision="auto",
        checkpoint_every_s=1e9,  # only the end-of-pack checkpoint, as in a pipeline job
        prefetch_windows=1,
        device_cache_gb=0,
    )
    mach = machine(device)
    print(f"preset {args.preset} {p}, K {ks}, vary {args.vary}, on {mach['gpu'] or mach['processor']}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="saepipe-pack-bench-", dir=args.tmp_dir) as tmp:
        t0 = time.perf_counter()
        shards = write_shards(Path(tmp) / "shards", p)
        print(f"  {len(shards)} shards written in {time.perf_counter() - t0:.1f}s", flush=True)
        warm = replace(cfg, tokens=2 * p["batch"])
        bench_pack(p, 1, args.vary, warm, shards, Path(tmp) / "warmup")
        for K in ks:
            rows.append(bench_pack(p, K, args.vary, cfg, shards, Path(tmp) / f"K{K}"))
            r = rows[-1]
            print(
                f"  K={K}: {r['wall_s']:.2f}s, {r['tokens_per_s_per_sae']:,.0f} tok/s per SAE, "
                f"{r['bytes_read_per_sae']:,.0f} bytes read per SAE",
                flush=True,
            )
    base = rows[0]
    for r in rows:
        r["speedup_per_sae"] = r["tokens_per_s_per_sae"] / base["tokens_per_s_per_sae"]
        r["loop_speedup_per_sae"] = r["loop_tokens_per_s_per_sae"] / base["loop_tokens_per_s_per_sae"]
        r["bytes_per_sae_vs_k1"] = r["bytes_read_per_sae"] / base["bytes_read_per_sae"]
    resolved = cfg.resolved(device)
    result = {
        "command": "python "
        + " ".join(
            [sys.argv[0] if argv is None else "bench/pack_throughput.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device_type": device.type,
        "machine": mach,
        "precision": "bf16 autocast" if resolved.precision == "bf16" else "fp32",
        "preset_name": args.preset,
        "preset": p,
        "vary": args.vary,
        "tokens": base["tokens"],
        "shard_bytes": base["shard_bytes"],
        "train_config": asdict(resolved),
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"pack_throughput-{dt.date.today()}-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"written {stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
