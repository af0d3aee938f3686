"""IDX files (the MNIST family's format), parsed with numpy and checked strictly.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimension sizes, then ``prod(dims)`` items of the dtype, big-endian, row-major
(LeCun et al., http://yann.lecun.com/exdb/mnist/). Files may be gzip-compressed. Every check that
fails raises :class:`IDXFormatError` naming the file and what is wrong: a dataset is either read
completely and exactly or not at all.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IDXFormatError", "IDXFile", "decompress", "read_idx", "parse_idx", "encode_idx"]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype codes -> big-endian numpy dtypes.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}


class IDXFormatError(ValueError):
    """An IDX file is truncated, corrupt, or not what was expected (the message names the file)."""


@dataclass(frozen=True)
class IDXFile:
    """A parsed IDX file.

    Attributes
    ----------
    array : numpy.ndarray
        The data in native byte order, shape ``dims``.
    sha256, md5 : str
        Hex digests of the *decompressed* IDX bytes (equal for a file and any recompressed copy).
    path : str
        Where it was read from (for messages).
    """

    array: np.ndarray
    sha256: str
    md5: str
    path: str


def decompress(raw: bytes, name: str) -> bytes:
    """Return ``raw`` decompressed if it is gzip data, else unchanged.

    Raises
    ------
    IDXFormatError
        If the gzip stream is truncated or corrupt.
    """
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise IDXFormatError(f"{name}: corrupt or truncated gzip data ({err})") from err


def _dim_word(n: int) -> str:
    return f"{n} dimension" + ("" if n == 1 else "s")


def parse_idx(data: bytes, name: str = "<bytes>", ndim: int | None = None) -> np.ndarray:
    """Parse decompressed IDX bytes into an array, checking magic number, dims and size.

    Parameters
    ----------
    data : bytes
        The decompressed IDX file contents.
    name : str
        Used in error messages (usually the file path).
    ndim : int, optional
        The number of dimensions the caller expects (1 for labels, 3 for images). Checked
        against the header *before* the dimension sizes are read, so a file with a wrong magic
        number is reported as such rather than as an absurdly large truncated file.
    """
    if len(data) < 4:
        raise IDXFormatError(f"{name}: file is {len(data)} bytes, too short for an IDX header")
    zero, code, header_ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _DTYPES:
        raise IDXFormatError(
            f"{name}: bad magic number 0x{data[:4].hex()} (expected 0x0000 followed by a dtype "
            f"code in {{{', '.join(hex(c) for c in _DTYPES)}}} and the number of dimensions); "
            "not an IDX file"
        )
    if header_ndim == 0:
        raise IDXFormatError(f"{name}: header declares 0 dimensions")
    if ndim is not None and header_ndim != ndim:
        raise IDXFormatError(
            f"{name}: bad magic number 0x{data[:4].hex()}: expected {_dim_word(ndim)}, header "
            f"says {header_ndim}"
        )
    header = 4 + 4 * header_ndim
    if len(data) < header:
        raise IDXFormatError(f"{name}: truncated header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=header_ndim, offset=4))
    dtype = _DTYPES[code]
    # Python integers: a corrupt header must not overflow into a negative or wrapped size.
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) < expected:
        raise IDXFormatError(
            f"{name}: truncated: header declares shape {dims} ({expected} bytes in all) but the "
            f"file has {len(data)} bytes"
        )
    if len(data) > expected:
        raise IDXFormatError(
            f"{name}: {len(data) - expected} unexpected trailing bytes after the {expected} "
            f"bytes that shape {dims} needs"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> IDXFile:
    """Read an IDX file (gzip-compressed or raw) and return its array and decompressed digests.

    ``ndim``: the expected number of dimensions (see :func:`parse_idx`).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise IDXFormatError(f"{path}: cannot read ({err})") from err
    data = decompress(raw, str(path))
    array = parse_idx(data, str(path), ndim=ndim)
    return IDXFile(
        array=array,
        sha256=hashlib.sha256(data).hexdigest(),
        md5=hashlib.md5(data).hexdigest(),
        path=str(path),
    )


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as (uncompressed) IDX bytes; the inverse of :func:`parse_idx`."""
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"array: dtype {array.dtype} has no IDX code (allowed: uint8, int8, int16, int32, "
            "float32, float64)"
        )
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array: ndim must be in [1, 255], got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(_DTYPES[code], copy=False).tobytes()
