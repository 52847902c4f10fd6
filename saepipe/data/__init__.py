"""Data layer: the text corpus, Zarr activation shards and the streaming loader."""
