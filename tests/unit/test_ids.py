"""Random ids from a pooled urandom (refold.core.ids): valid version-4 UUIDs, unique, never
repeated across a fork or across threads."""

from __future__ import annotations

import os
import threading
import uuid

from refold.core.ids import random_uuid


def test_ids_are_canonical_version_4_uuids_and_unique() -> None:
    ids = [random_uuid() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:600]:  # past two pool refills
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # every bit outside version and variant varies: no bit stuck at 0 or 1
    ored = anded = (1 << 128) - 1
    ored = 0
    for text in ids:
        value = uuid.UUID(text).int
        ored |= value
        anded &= value
    fixed = (0xF000 << 64) | (0xC000 << 48)
    assert ored | fixed == (1 << 128) - 1
    assert anded & ~fixed == 0


def test_a_forked_child_and_threads_never_repeat_an_id() -> None:
    random_uuid()  # the pool is filled: a child that kept it would repeat what follows
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, ",".join(random_uuid() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    mine = [random_uuid() for _ in range(300)]
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split(",")
    os.waitpid(pid, 0)
    assert len(theirs) == 300 and not set(mine) & set(theirs)

    per_thread: list[list[str]] = [[] for _ in range(4)]
    threads = [
        threading.Thread(target=lambda out=out: out.extend(random_uuid() for _ in range(2_000)))
        for out in per_thread
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for ids in per_thread for i in ids]
    assert len(set(everything)) == len(everything) == 8_000
