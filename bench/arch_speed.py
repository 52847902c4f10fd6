"""Training-step speed of every registered SAE architecture at equal total width.

    python bench/arch_speed.py                 # CPU preset (d=128, M=4096, N=16, batch 4096)
    python bench/arch_speed.py --preset h200   # GPU preset (d=768, M=24576, N=32, k=32, batch 16384, bf16)

One step = forward + backward + Adam + the SAE's decoder hooks, timed side by side in one
run (median of --steps after --warmup). Two references (bench/_common.py, never in
the library): `dense_topk` (dense encoder AND dense decode, the straightforward SAE) and
`reference_switch` (the papers' code style: every expert's encoder computed densely, then
masked to the routed expert). Ratios are against dense TopK (`topk`, our sparse decode)
and against `reference_switch`. Results: a printed table and bench/results/arch_speed-*.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _common import DenseTopK, ReferenceSwitch, routing_fields, time_steps, topk_arch  # noqa: E402

from saepipe.saes import ARCHITECTURES, build_sae  # noqa: E402

PRESETS = {
    "cpu": dict(d=128, M=4096, N=16, k=32, batch=4096, dtype="float32"),
    "h200": dict(d=768, M=24576, N=32, k=32, batch=16384, dtype="bfloat16"),
}


def library_configs(p: dict) -> dict[str, dict]:
    """One config per registered architecture at total width M (routed: N experts; with a
    configurable experts per token, as Scale: e=2)."""
    d, M, k, N = p["d"], p["M"], p["k"], p["N"]
    out = {}
    for arch in ARCHITECTURES:
        routed, per_token = routing_fields(arch)
        extra = ({"n_experts": N} if routed else {}) | ({"active_experts": 2} if per_token else {})
        out[arch] = {"arch": arch, "d_in": d, "width": M, "k": k, **extra}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    device, dtype = torch.device(args.device), getattr(torch, p["dtype"])
    torch.manual_seed(0)
    x = torch.randn(p["batch"], p["d"], device=device)

    models = {name: build_sae(cfg).to(device) for name, cfg in library_configs(p).items()}
    models["dense_topk"] = DenseTopK(p["d"], p["M"], p["k"]).to(device)
    models["reference_switch"] = ReferenceSwitch(p["d"], p["M"], p["k"], p["N"]).to(device)
    rows = []
    for name, model in models.items():
        sec = time_steps(model, x, args.steps, args.warmup, None if dtype == torch.float32 else dtype)
        rows.append({"arch": name, "ms_per_step": 1e3 * sec, "tokens_per_s": p["batch"] / sec})
    by = {r["arch"]: r for r in rows}
    for r in rows:
        r["speedup_vs_topk"] = by[topk_arch()]["ms_per_step"] / r["ms_per_step"]
        r["speedup_vs_dense_topk"] = by["dense_topk"]["ms_per_step"] / r["ms_per_step"]
        r["speedup_vs_reference_switch"] = by["reference_switch"]["ms_per_step"] / r["ms_per_step"]

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"preset {args.preset} {p} on {dev_name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'arch':<18}{'ms/step':>10}{'tokens/s':>12}{'vs topk':>9}{'vs dense':>10}{'vs ref-switch':>15}")
    for r in rows:
        print(
            f"{r['arch']:<18}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['speedup_vs_topk']:>9.2f}"
            f"{r['speedup_vs_dense_topk']:>10.2f}{r['speedup_vs_reference_switch']:>15.2f}"
        )
    out = args.out or REPO / f"bench/results/arch_speed-{dt.date.today()}-{args.preset}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "date": dt.datetime.now().isoformat(timespec="seconds"),
                "device": dev_name,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "preset": p,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
