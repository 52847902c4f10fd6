"""saepipe SAEs in other libraries' formats.

- :mod:`.export`: the `export` stage, a saved SAE (docs/reference.md §2) as a SAELens 6.x
  directory (docs/reference.md §7): activation normalisation folded in, per-latent firing
  frequencies, a model card. Reads the architecture's traits (``SAELENS_ARCH``, ``ROUTED``,
  ...) and its saved tensors, never its name.
- :mod:`.saebench`: the `export_saebench` stage, an SAE's SAEBench 0.6.0 core results
  (``results/saebench/core/<id>_eval_results.json``) from its metrics.json, its per-latent
  statistics and its raw-space weights (docs/reference.md §7).
- :mod:`.saelens`: the SAELens plugin for the routed SAEs (Switch, Scale), which SAELens has
  no class for. It imports only torch and sae_lens (nothing from saepipe), so it is not
  imported here: SAELens users import it (``import saepipe.interop.saelens``) or copy the file.

This package sits above :mod:`saepipe.saes` and :mod:`saepipe.data`; nothing below imports it.
"""
