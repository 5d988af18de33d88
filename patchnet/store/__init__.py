"""The one cache protocol: every cache folder (features, unlock's boundary maps, the per-layer vectors) is keyed
by a hash of what changes its bytes, built in chunks under a lock, joined into row files and an item index
with each file's size and CRC-32, and read back checked. It stores and reads; it never runs a model.

``folder``: the key, the lock, open-or-build; ``build``: a chunked build; ``chunks``: the chunk files;
``rows``: the row files; ``integrity``: sizes, checksums, the errors; ``readers``: ``ItemIndex``,
``FeatureStore``; ``verify``: ``patchnet cache verify``.
"""

from .build import CacheSpec, fill_chunks
from .chunks import INDEX_ARRAYS, chunk_arrays, chunk_rows, finish_join
from .folder import CACHE_VERSION, building, key, keyed_file, keyed_folder, open_or_build, ready
from .integrity import UNREADABLE, CacheError, complete, damaged, memmap
from .readers import FeatureStore, ItemIndex, Rows, row_file
from .rows import join_chunks, save_projection, transcode, write_rows
from .verify import cache_folders, verify_cache

__all__ = [
    "CACHE_VERSION",
    "INDEX_ARRAYS",
    "UNREADABLE",
    "CacheError",
    "CacheSpec",
    "FeatureStore",
    "ItemIndex",
    "Rows",
    "building",
    "cache_folders",
    "chunk_arrays",
    "chunk_rows",
    "complete",
    "damaged",
    "fill_chunks",
    "finish_join",
    "join_chunks",
    "key",
    "keyed_file",
    "keyed_folder",
    "memmap",
    "open_or_build",
    "ready",
    "row_file",
    "save_projection",
    "transcode",
    "verify_cache",
    "write_rows",
]
