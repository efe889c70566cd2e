"""The Zarr v3 store: schema (``storage.schema``), reading/writing (``storage.store``) and the
training dataset (``storage.dataset``, imported explicitly since it needs torch)."""

from storage.errors import InputError
from storage.schema import ARRAYS, SCHEMA_VERSION
from storage.store import (
           Scene,
           SceneWriter,
           Store,
           StoreWriteError,
           create_store,
           open_store,
           recover_store,
           store_lock,
)

__all__ = ["ARRAYS", "SCHEMA_VERSION", "InputError", "Scene", "SceneWriter", "Store", "StoreWriteError",
           "create_store", "open_store", "recover_store",
           "store_lock"]
