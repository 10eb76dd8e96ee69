"""Random ids without a system call per id: version-4 UUIDs from a per-thread pool of urandom.

`uuid.uuid4()` reads 16 bytes with `os.urandom` for every id. The system call releases the GIL
and the thread must win it back: in a worker whose HTTP thread shares the GIL with a processor,
a results index and claims threads, that wait was 16% of the HTTP thread's samples at 1,000
commands/s (py-spy), and 8% of the processor's (an id per event). Here each thread reads 4 KiB
of urandom at once (256 ids) and cuts ids from it: the same randomness (the kernel's CSPRNG,
so ids stay unguessable: a command id is an idempotency key, and a predictable one would let
someone claim another's), one system call per 256 ids. A forked child starts a new pool, so it
never repeats its parent's ids.
"""

from __future__ import annotations

import os
import threading

_IDS_PER_READ = 256
_VARIANT = "89ab"


class _Pool(threading.local):
    def __init__(self) -> None:
        self.data = b""
        self.at = 0


_pool = _Pool()


def _new_pool_after_fork() -> None:
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_new_pool_after_fork)


def random_uuid() -> str:
    """A random (version 4, RFC 4122 variant) UUID in its canonical text form."""
    pool = _pool
    at = pool.at
    if at >= len(pool.data):
        pool.data, at = os.urandom(16 * _IDS_PER_READ), 0
    pool.at = at + 16
    h = pool.data[at : at + 16].hex()
    # version 4 in the 13th digit; the variant's bits 10 on top of the 17th (8, 9, a or b)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
