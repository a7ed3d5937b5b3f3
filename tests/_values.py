"""Test values that every dtype holds as drawn: no test relies on how NumPy or ml_dtypes casts
a value its dtype cannot represent (out-of-range casts warn or not, saturate or wrap, depending
on the release)."""

import ml_dtypes
import numpy as np

# Every dtype the README lists as a leaf's (those this ml_dtypes has).
ALL_DTYPES = [np.dtype(d) for d in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128)] + [
    np.dtype(getattr(ml_dtypes, name)) for name in (
        "bfloat16 int2 int4 uint2 uint4 float4_e2m1fn float8_e3m4 float8_e4m3 "
        "float8_e4m3b11fnuz float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz "
        "float8_e8m0fnu").split() if hasattr(ml_dtypes, name)]

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
