"""Time-ordered ids: unique, rising, version 7, and not repeated across a fork."""

from __future__ import annotations

import os
import uuid

from agent_orchestrator.ids import new_id

RANDOM_BITS = (1 << 62) - 1


def test_ids_are_unique_rising_version_7() -> None:
    ids = [new_id() for _ in range(20_000)]  # many share a millisecond
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert {i.version for i in ids} == {7}
    assert {i.variant for i in ids} == {uuid.RFC_4122}


def test_a_forked_child_does_not_repeat_its_parents_random_bits() -> None:
    new_id()  # the parent now holds read-ahead random bytes
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and exits
        os.write(write, new_id().bytes)
        os._exit(0)
    os.close(write)
    parent_id = new_id()
    child_id = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    os.waitpid(child, 0)
    assert parent_id.int & RANDOM_BITS != child_id.int & RANDOM_BITS
