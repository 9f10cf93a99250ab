"""store.deadlines: a blocked read is cut at its deadline; a finished one never is."""

from __future__ import annotations

import socket
import time

from otpgate.store.deadlines import Deadlines


def test_a_read_blocked_past_its_deadline_returns() -> None:
    deadlines = Deadlines()
    ours, peer = socket.socketpair()
    try:
        start = time.monotonic()
        deadline = deadlines.start(ours.fileno(), 0.3)
        assert ours.recv(1) == b""  # the peer never writes: only the cut ends this
        deadlines.finish(deadline)
        assert deadline.expired
        assert 0.25 < time.monotonic() - start < 5
        assert ours.fileno() != -1  # shut down, not closed: the descriptor is still ours
    finally:
        ours.close()
        peer.close()
        deadlines.stop()


def test_a_finished_conversation_is_left_alone() -> None:
    deadlines = Deadlines()
    ours, peer = socket.socketpair()
    try:
        deadline = deadlines.start(ours.fileno(), 0.2)
        deadlines.finish(deadline)
        time.sleep(0.4)
        assert not deadline.expired
        peer.sendall(b"x")
        assert ours.recv(1) == b"x"
    finally:
        ours.close()
        peer.close()
        deadlines.stop()


def test_deadlines_fire_in_order_whatever_the_order_registered() -> None:
    deadlines = Deadlines()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        late = deadlines.start(pairs[0][0].fileno(), 5.0)
        soon = deadlines.start(pairs[1][0].fileno(), 0.1)
        sooner = deadlines.start(pairs[2][0].fileno(), 0.05)
        assert pairs[1][0].recv(1) == b"" and pairs[2][0].recv(1) == b""
        assert soon.expired and sooner.expired and not late.expired
        deadlines.finish(late)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        deadlines.stop()
