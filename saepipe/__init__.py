"""saepipe: train, evaluate and compare sparse autoencoders on language-model activations.

Layers (each imports only the ones below it):
    saepipe.saes      SAE architectures + registry (pure torch; usable alone)
    saepipe.io, devices, codeversion   small shared utilities
    saepipe.data      corpus, Zarr activation shards, streaming loader
    saepipe.lm        the language model (TransformerLens 4.x bridge)
    saepipe.extract / train / evaluate / aggregate / plots   the pipeline stages
"""

__version__ = "0.1.0"
