"""Give freed heap memory back to the system when the agent goes idle.

Contract: ``release()`` asks glibc's allocator to return the free pages of its heaps
(``malloc_trim(0)``); it costs well under a millisecond for an agent's heap and does
nothing where there is no glibc (musl, other systems). Why: start-up (imports,
enrollment) and each burst of work (an inventory report, a script's output, an
exchange's JSON) leave megabytes freed but still resident, and an idle agent would
otherwise keep them for good: 1.0-1.1 MB of its idle RSS (benchmarks/README.md,
"agent idle RSS"; the fleet's agents run on every managed computer).
"""

from __future__ import annotations

from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_loaded = False


def release() -> bool:
    """Trim the heap now; True if the allocator supports it."""
    global _trim, _loaded
    if not _loaded:
        _loaded = True
        try:
            import ctypes  # only here: the agent never needs it otherwise

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = None
    if _trim is None:
        return False
    _trim(0)
    return True
