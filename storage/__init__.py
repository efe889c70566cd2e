"""The Zarr v3 store: schema (``storage.schema``), reading/writing (``storage.store``), the training
dataset (``storage.dataset``), benchmarks (``storage.benchmarks``), leases and object paths.

Nothing is imported here, so ``storage.errors`` and ``storage.benchmarks`` (which the network
uses) load without Zarr: the step benchmark runs on a GPU machine without the storage stack.
Import what you need from its module (``from storage.store import open_store``).
"""
