"""Which SAEs of a sweep are trained together (``train.pack: K``), deterministically.

A pack is one training job: its SAEs read each batch once and are trained side by side
(:func:`saepipe.train.train_pack`). SAEs can share a pack only if they share the batch
stream, so packs are formed

1. within one sweep group (the group's ``train.pack`` decides K; a group can set its own),
2. among the SAEs whose train settings are equal except :data:`MEMBER_FIELDS` (``lr``,
   ``grad_clip``, ``warmup_steps``, ``decay_fraction``, ``log_every``): same tokens,
   batch size, seed, precision, ...; in particular **each seed of a seed axis has its own
   packs**, because the seed sets both the init and the order of the batches: SAEs of
   different seeds never share a stream, and a seed replicate stays a full replicate;
3. by cutting those SAEs, in sweep order, into consecutive runs of K (the last may be shorter).

A pack's name is its first SAE's id for a pack of one (``train.pack: 1``, the default: one
job per SAE, as without packs) and ``<first id>+<K-1>`` otherwise (``topk-k16-s0+1``).

What reruns: the pack's job reruns when any of its SAEs changes (its fields or train
settings) and then retrains all of them; the other packs are untouched. Changing K (or
adding a point that shifts later SAEs into other packs) re-forms packs and retrains the SAEs
of the packs whose membership changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from saepipe.io import atomic_path
from saepipe.train.config import MEMBER_FIELDS, RUNTIME_FIELDS, TrainConfig
from saepipe.train.loop import Member, train_pack

MANIFEST = "pack.json"
SAE_FILES = ("sae.safetensors", "config.json", "train_log.jsonl")
"""What a pack job writes for each SAE, in ``<pack dir>/<sae id>/``."""


def stream_key(train: dict) -> str:
    """The train settings SAEs must share to be trained on one stream (canonical JSON)."""
    shared = {k: v for k, v in train.items() if k not in MEMBER_FIELDS + RUNTIME_FIELDS}
    return json.dumps(shared, sort_keys=True)


def pack_size(train: dict) -> int:
    """``train.pack`` of a sweep point's train settings (default 1)."""
    k = train.get("pack", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"train.pack must be an int >= 1 (SAEs per training job), got {k!r}")
    return k


def form_packs(saes: dict[str, dict]) -> dict[str, list[str]]:
    """Pack name -> SAE ids, for the sweep points ``saes`` (``saepipe.sweep.expand_sweep``:
    id -> {"group", "train", ...}, in sweep order); see the module docstring."""
    buckets: dict[tuple[str, str], list[str]] = {}
    for sid, point in saes.items():
        buckets.setdefault((point["group"], stream_key(point["train"])), []).append(sid)
    packs: dict[str, list[str]] = {}
    for ids in buckets.values():
        k = pack_size(saes[ids[0]]["train"])
        for i in range(0, len(ids), k):
            members = ids[i : i + k]
            name = members[0] if len(members) == 1 else f"{members[0]}+{len(members) - 1}"
            packs[name] = members
    order = {sid: i for i, sid in enumerate(saes)}
    return dict(sorted(packs.items(), key=lambda item: order[item[1][0]]))


def pack_of(packs: dict[str, list[str]]) -> dict[str, str]:
    """SAE id -> the name of its pack."""
    return {sid: name for name, members in packs.items() for sid in members}


def run_pack(
    saes: dict[str, dict], trains: dict[str, dict], runtime: dict, shards: list[str], pack_dir: str | Path
) -> dict:
    """The train job of one pack: train the SAEs ``saes`` (id -> SAE fields) with their train
    settings ``trains`` (id -> fields; plus the ``runtime`` ones) on ``shards``; each is saved
    in ``pack_dir/<id>/`` (:data:`SAE_FILES`, checkpoint there too), then the manifest
    ``pack_dir/pack.json`` (members, steps, bytes read, wall time) is written. Returns it."""
    pack_dir = Path(pack_dir)
    members = [Member(fields, TrainConfig(**trains[sid], **runtime), pack_dir / sid) for sid, fields in saes.items()]
    t0 = time.time()
    run = train_pack(members, shards, name=pack_dir.name)
    manifest = {
        "pack": pack_dir.name,
        "members": list(saes),
        "steps": run.steps,
        "tokens": run.rows[0]["tokens"],
        "bytes_read": run.bytes_read,
        "shard_bytes": run.shard_bytes,
        "wall_time_s": time.time() - t0,
    }
    with atomic_path(pack_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def publish(pack_dir: str | Path, sae: str, out_dir: str | Path) -> None:
    """Put SAE ``sae``'s files from its pack's directory into ``out_dir`` (results/saes/<id>/,
    where every later stage reads them): hard links (no copy), a copy where links fail."""
    src, dst = Path(pack_dir) / sae, Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in SAE_FILES:
        if not (src / name).is_file():
            raise FileNotFoundError(
                f"{src / name} is missing: the train job of pack {Path(pack_dir).name} did not "
                f"save SAE {sae}; rerun it (snakemake --forcerun {Path(pack_dir, MANIFEST)})"
            )
        (dst / name).unlink(missing_ok=True)
        try:
            os.link(src / name, dst / name)
        except OSError:
            shutil.copy2(src / name, dst / name)
        os.utime(dst / name)  # newer than pack.json (a link shares the older file's mtime)
