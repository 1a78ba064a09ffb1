"""The stable hash that maps raw categorical ids into an embedding table's rows.

bucket(id) = 1 + splitmix64(id) mod (buckets - 1); row 0 is reserved for a missing value.
splitmix64 is a fixed bijection on 64-bit integers, so the mapping is the same in every
process, machine and run (unlike Python's hash(), which is salted per process).
"""
import numpy as np

MISSING_BUCKET = 0
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of int64 ids (two's complement), as uint64; wraps modulo 2**64."""
    x = ids.astype(np.int64, copy=False).view(np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def hash_to_buckets(ids: np.ndarray, buckets: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Row of each id in a table of `buckets` rows (int64); invalid (null) entries get row 0."""
    rows = (splitmix64(ids) % np.uint64(buckets - 1)).astype(np.int64) + 1
    if valid is not None:
        rows[~valid] = MISSING_BUCKET
    return rows
