"""Test values that every dtype holds as drawn: no test relies on how NumPy or ml_dtypes casts
a value its dtype cannot represent (out-of-range casts warn or not, saturate or wrap, depending
on the release)."""

import ml_dtypes
import numpy as np


# ml_dtypes' integer types NumPy gives the kind "V".
_SUB_BYTE_INTS = ("int2", "int4", "uint2", "uint4")


def representable(dtype, shape, seed=0):
    """Random values of `dtype` and `shape`, each one exactly representable in `dtype`."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu" or dtype.name in _SUB_BYTE_INTS:
        info = ml_dtypes.iinfo(dtype)
        wide = np.uint64 if info.min == 0 else np.int64
        return rng.integers(int(info.min), int(info.max), shape, wide, endpoint=True).astype(dtype)
    if dtype.kind == "c":
        return (rng.normal(size=shape) * 4 + 1j * rng.normal(size=shape)).astype(dtype)
    x = rng.normal(size=shape) * 4
    info = ml_dtypes.finfo(dtype)
    if float(info.min) >= 0:  # unsigned floats (float8_e8m0fnu)
        x = np.abs(x)
    return np.clip(x, float(info.min), float(info.max)).astype(dtype)
