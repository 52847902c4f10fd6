# Functions shared by the stage files under rules/ (Snakemake keeps functions apart from rules).


def extract_slice(split):
    """The part of config["extract"] that one split's shards depend on."""
    cfg = dict(config["extract"])
    other = "eval" if split == "train" else "train"
    cfg.pop(f"{other}_tokens")
    return canonical(cfg)


def moe_logs(arch=("switch", "scale")):
    """Training logs of the sweep's MoE SAEs of these architectures (expert load, omega figures)."""
    return expand("results/saes/{sae}/train_log.jsonl", sae=moe_ids(sweep_rows(SAES), set(arch)))


def geometry_inputs(wildcards):
    """Weights of the SAEs the feature-geometry figures show (availability.geometry_ids)."""
    return expand("results/saes/{sae}/sae.safetensors", sae=geometry_ids(sweep_rows(SAES)))
