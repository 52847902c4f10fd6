# Functions shared by the stage files under rules/ (Snakemake keeps functions apart from rules).


def extract_slice(split):
    """The part of config["extract"] that one split's shards depend on."""
    cfg = dict(config["extract"])
    other = "eval" if split == "train" else "train"
    cfg.pop(f"{other}_tokens")
    return canonical(cfg)


def trait_logs(trait):
    """Training logs of the sweep's SAEs whose architecture has `trait` (saepipe.saes.arch_traits),
    e.g. "routed" for the expert load figure, "has_omega" for the omega figure."""
    ids = sorted(r["sae_id"] for r in sweep_rows(SAES) if row_trait(r, trait))
    return expand("results/saes/{sae}/train_log.jsonl", sae=ids)


def geometry_weights():
    """Weights of the SAEs the feature-geometry figures show (availability.geometry_ids)."""
    return expand("results/saes/{sae}/sae.safetensors", sae=geometry_ids(sweep_rows(SAES)))


def figure_inputs(fig, table):
    """The named input files of a registered figure's rule, one entry per `fig.inputs`
    (saepipe.plots.registry; Figure.draw turns them into the drawing function's arguments);
    `table`: the aggregate rule's output."""
    files = {}
    for kind in fig.inputs:
        if kind == "table":
            files["table"] = table
        elif kind.startswith("logs:"):
            files["logs"] = trait_logs(fig.logs_trait)
        elif kind == "saes":
            files["saes"] = geometry_weights()
        elif kind == "autointerp":  # the inspected SAEs' verdicts (rules/features.smk)
            files["autointerp"] = expand("results/saes/{sae}/autointerp.parquet", sae=INSPECTED)
        else:  # "sae": the first geometry SAE
            files["sae"] = geometry_weights()[:1]
    return files


def pack_saes(wildcards):
    """SAE id -> SAE fields, for the SAEs of one pack (rule train's params)."""
    return canonical({sid: SAES[sid]["sae"] for sid in PACKS[wildcards.pack]})


def pack_train(wildcards):
    """SAE id -> train settings (runtime fields aside: they come from config), for one pack."""
    return canonical({sid: split_runtime(SAES[sid]["train"])[0] for sid in PACKS[wildcards.pack]})


def pack_mem_mb(wildcards):
    """Memory of a train job: 2 GB plus 1 GB per SAE of its pack."""
    return 2000 + 1000 * len(PACKS[wildcards.pack])


def pack_manifest(wildcards):
    """The manifest of the pack that trains SAE `wildcards.sae` (saepipe.train.packs)."""
    return f"results/packs/{PACK_OF[wildcards.sae]}/pack.json"
