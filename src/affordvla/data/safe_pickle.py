"""Reading pickled files from datasets without running arbitrary code.

CALVIN's `auto_lang_ann.npy` is a pickled dict inside a .npy file and RLBench's `low_dim_obs.pkl` is a pickle of
its own classes. `pickle.load` on such files would execute whatever a tampered file asks for. The unpickler here
resolves only the globals it is told to allow (numpy array reconstruction by default) and refuses the rest with
an error naming the file and the refused global.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

# numpy moved `core` to `_core` in 2.0; pickles written by either version name one of them
_NUMPY_RECONSTRUCTION = {
    (module, name)
    for core in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{core}.multiarray", "_reconstruct"),
        (f"{core}.multiarray", "scalar"),
        (f"{core}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype"),
     ("_codecs", "encode")}  # protocol 0-2 pickles carry array bytes as latin-1 text re-encoded by this
_NUMPY_DTYPES = {("numpy", name) for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                              "uint8", "uint16", "uint32", "uint64", "bool_")}
NUMPY_GLOBALS: frozenset[tuple[str, str]] = frozenset(_NUMPY_RECONSTRUCTION | _NUMPY_DTYPES)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowed set."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only the allowed globals (numpy arrays and their dtypes by default) and refuses
    any other, so a data file cannot run code."""

    def __init__(self, file, *, source: str, allowed: frozenset[tuple[str, str]] = NUMPY_GLOBALS,
                 replacements: Mapping[tuple[str, str], Callable[..., Any] | type] | None = None):
        super().__init__(file)
        self.source = source
        self.allowed = allowed
        self.replacements = dict(replacements or {})

    def find_class(self, module: str, name: str):
        if (module, name) in self.replacements:
            return self.replacements[(module, name)]
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self.source}: refusing to load global {module}.{name} (not in the allowed set)")


def load_pickle(path: str | Path, **kwargs) -> Any:
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=str(path), **kwargs).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise pickle.UnpicklingError(f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None


def load_object_npy(path: str | Path, **kwargs) -> Any:
    """A .npy file holding a pickled object array (what `np.save(path, some_dict)` writes), unpickled with the
    restricted unpickler. A 0-d object array gives back the object itself, as `np.load(...).item()` would."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = read_header[version](f)
        except ValueError as exc:
            raise ValueError(f"{path}: not a .npy file ({exc})") from None
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        payload = f.read()
    try:
        array = RestrictedUnpickler(io.BytesIO(payload), source=str(path), **kwargs).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise pickle.UnpicklingError(
            f"{path}: corrupt or truncated pickled array ({type(exc).__name__}: {exc})") from None
    if isinstance(array, np.ndarray) and array.shape == () and shape == ():
        return array.item()
    return array
