"""Session fixtures with a preprocessed synthetic Zarr store (owned by the storage work)."""
