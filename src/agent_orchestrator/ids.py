"""Time-ordered UUIDs (version 7 layout), so ids sort by creation like their rows do."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0
#: os.urandom read ahead for 64 ids at a time: one system call per id was ~2% of an
#: embedded chat turn (a turn makes about ten ids).
_RANDOM_BATCH = 64
_random = b""
_random_at = 0


def _forget_random() -> None:
    # A forked child must not reuse its parent's unread bytes (the same ids would follow).
    global _random, _random_at
    _random, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random)


def _random_bits() -> int:
    """62 random bits from the read-ahead buffer (the caller holds `_lock`)."""
    global _random, _random_at
    if _random_at >= len(_random):
        _random, _random_at = os.urandom(8 * _RANDOM_BATCH), 0
    chunk = _random[_random_at : _random_at + 8]
    _random_at += 8
    return int.from_bytes(chunk, "big") & ((1 << 62) - 1)


def new_id() -> uuid.UUID:
    """48-bit millisecond clock, 12-bit counter for ids made in the same millisecond, random."""
    global _last_ms, _counter
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            now_ms = _last_ms
        else:
            _last_ms = now_ms
            _counter = 0
        counter = _counter
        rand = _random_bits()
    value = (now_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand
    return uuid.UUID(int=value)
