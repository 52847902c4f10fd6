# Functions shared by the stage files under rules/ (Snakemake keeps functions apart from rules).


def extract_slice(split):
    """The part of config["extract"] that one split's shards depend on."""
    cfg = dict(config["extract"])
    other = "eval" if split == "train" else "train"
    cfg.pop(f"{other}_tokens")
    return canonical(cfg)


def moe_logs(trait="routed"):
    """Training logs of the sweep's SAEs whose architecture has `trait` (saepipe.saes.arch_traits):
    "routed" for the expert load figure, "has_omega" for the omega figure."""
    ids = sorted(r["sae_id"] for r in sweep_rows(SAES) if row_trait(r, trait))
    return expand("results/saes/{sae}/train_log.jsonl", sae=ids)


def geometry_inputs(wildcards):
    """Weights of the SAEs the feature-geometry figures show (availability.geometry_ids)."""
    return expand("results/saes/{sae}/sae.safetensors", sae=geometry_ids(sweep_rows(SAES)))
