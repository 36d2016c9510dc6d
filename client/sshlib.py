"""asyncssh, imported without its slow search for liboqs.

On import, asyncssh looks for liboqs (for the sntrup761 key exchange) with
``ctypes.util.find_library``. On Linux, when the library is not installed (the usual
case), that runs ``ldconfig -p``, then ``gcc`` and then ``ld`` to be sure: 50-150 ms
of every dtclient run that connects. Here the search first asks the linker cache
(``/etc/ld.so.cache``, read, nothing run): a name it does not hold, with no
``LD_LIBRARY_PATH`` that could hold it either, is answered "not found" at once; any
other case takes the standard search, so an installed liboqs is found as before.
Every module of dtclient imports asyncssh from here.
"""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

LD_CACHE = Path("/etc/ld.so.cache")
_standard = ctypes.util.find_library


def _in_linker_cache(name: str) -> bool | None:
    """Whether the linker cache names lib<name>.so; None when it cannot be read."""
    try:
        cache = LD_CACHE.read_bytes()
    except OSError:
        return None
    return f"lib{name.removeprefix('lib')}.so".encode() in cache


def find_library(name: str) -> str | None:
    if os.name == "posix" and not os.environ.get("LD_LIBRARY_PATH"):
        if _in_linker_cache(name) is False:
            return None
    return _standard(name)


ctypes.util.find_library = find_library
try:
    import asyncssh
finally:
    ctypes.util.find_library = _standard

__all__ = ["asyncssh"]
