"""The TCP connection set-up machine (uproxy/connect.py), every branch without a socket.

Each case is a script: the events fed in order and the actions expected back
from each. A later C implementation of the set-up must pass the same table.
"""

from __future__ import annotations

import pytest

from uproxy.connect import (
    ABORT,
    ALL_FAILED,
    CANCELLED,
    CONNECT_TIMEOUTS,
    CONNECTED,
    FD_RETRY,
    FD_WAIT,
    NO_ENDPOINTS,
    NO_SOCKET,
    TIMED_OUT,
    WAIT_OVER,
    Action,
    Choose,
    Chosen,
    Connect,
    ConnectFailed,
    ConnectionSetup,
    Event,
    MarkFailed,
    MarkSucceeded,
    NoSocket,
    Relay,
    Reset,
    Start,
    WaitForFds,
)
from uproxy.model import Endpoint

A, B, C, D, E = (Endpoint(f"10.0.0.{i}", 80) for i in range(1, 6))
V6 = Endpoint("fd00::1", 80)
T = CONNECT_TIMEOUTS
REFUSED = ConnectFailed("Connection refused")
EMFILE = "Too many open files"

Step = tuple[Event, list[Action]]

CASES: dict[str, list[Step]] = {
    "no endpoint at all: RST at once": [
        (Start(None), [Reset(NO_ENDPOINTS)]),
    ],
    "first attempt connects": [
        (Start(A), [Connect(A, T[0])]),
        (CONNECTED, [MarkSucceeded(A), Relay(A)]),
    ],
    "an IPv6 endpoint is just an endpoint": [
        (Start(V6), [Connect(V6, T[0])]),
        (CONNECTED, [MarkSucceeded(V6), Relay(V6)]),
    ],
    "refused, then another endpoint connects": [
        (Start(A), [Connect(A, T[0])]),
        (REFUSED, [MarkFailed(A, "Connection refused"), Choose((A,))]),
        (Chosen(B), [Connect(B, T[1])]),
        (CONNECTED, [MarkSucceeded(B), Relay(B)]),
    ],
    "timed out, then another endpoint connects": [
        (Start(A), [Connect(A, T[0])]),
        (TIMED_OUT, [MarkFailed(A, "timed out"), Choose((A,))]),
        (Chosen(B), [Connect(B, T[1])]),
        (CONNECTED, [MarkSucceeded(B), Relay(B)]),
    ],
    "the only endpoint fails: nothing left to choose": [
        (Start(A), [Connect(A, T[0])]),
        (REFUSED, [MarkFailed(A, "Connection refused"), Choose((A,))]),
        (Chosen(None), [Reset(ALL_FAILED)]),
    ],
    "the same endpoint may come back (the balancer decides)": [
        (Start(A), [Connect(A, T[0])]),
        (TIMED_OUT, [MarkFailed(A, "timed out"), Choose((A,))]),
        (Chosen(A), [Connect(A, T[1])]),
        (TIMED_OUT, [MarkFailed(A, "timed out"), Choose((A, A))]),
        (Chosen(None), [Reset(ALL_FAILED)]),
    ],
    "four attempts with growing timeouts, then RST": [
        (Start(A), [Connect(A, T[0])]),
        (REFUSED, [MarkFailed(A, "Connection refused"), Choose((A,))]),
        (Chosen(B), [Connect(B, 0.5)]),
        (TIMED_OUT, [MarkFailed(B, "timed out"), Choose((A, B))]),
        (Chosen(C), [Connect(C, 1.0)]),
        (REFUSED, [MarkFailed(C, "Connection refused"), Choose((A, B, C))]),
        (Chosen(D), [Connect(D, 2.0)]),
        (TIMED_OUT, [MarkFailed(D, "timed out"), Reset(ALL_FAILED)]),
    ],
    "the fourth attempt may still connect": [
        (Start(A), [Connect(A, 0.25)]),
        (REFUSED, [MarkFailed(A, "Connection refused"), Choose((A,))]),
        (Chosen(B), [Connect(B, 0.5)]),
        (REFUSED, [MarkFailed(B, "Connection refused"), Choose((A, B))]),
        (Chosen(C), [Connect(C, 1.0)]),
        (REFUSED, [MarkFailed(C, "Connection refused"), Choose((A, B, C))]),
        (Chosen(D), [Connect(D, 2.0)]),
        (CONNECTED, [MarkSucceeded(D), Relay(D)]),
    ],
    "no socket for another reason: RST, the attempt does not count": [
        (Start(A), [Connect(A, T[0])]),
        (NoSocket(10.0, False, "Address family not supported"),
         [Reset(NO_SOCKET, "Address family not supported")]),
    ],
    "out of fds: wait, retry the same endpoint with the same timeout": [
        (Start(A), [Connect(A, T[0])]),
        (NoSocket(10.0, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (WAIT_OVER, [Connect(A, T[0])]),
        (NoSocket(10.05, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (WAIT_OVER, [Connect(A, T[0])]),
        (CONNECTED, [MarkSucceeded(A), Relay(A)]),
    ],
    "out of fds past the deadline (from the first one): RST": [
        (Start(A), [Connect(A, T[0])]),
        (NoSocket(10.0, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (WAIT_OVER, [Connect(A, T[0])]),
        (NoSocket(10.0 + FD_WAIT - 0.001, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (WAIT_OVER, [Connect(A, T[0])]),
        (NoSocket(10.0 + FD_WAIT, True, EMFILE), [Reset(NO_SOCKET, EMFILE)]),
    ],
    "out of fds on a later attempt keeps that attempt's timeout": [
        (Start(A), [Connect(A, T[0])]),
        (REFUSED, [MarkFailed(A, "Connection refused"), Choose((A,))]),
        (Chosen(B), [Connect(B, T[1])]),
        (NoSocket(5.0, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (WAIT_OVER, [Connect(B, T[1])]),
        (TIMED_OUT, [MarkFailed(B, "timed out"), Choose((A, B))]),
        (Chosen(C), [Connect(C, T[2])]),
        (CONNECTED, [MarkSucceeded(C), Relay(C)]),
    ],
    "a failed attempt ends the fd episode: the next one gets a new deadline": [
        (Start(A), [Connect(A, T[0])]),
        (NoSocket(10.0, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (WAIT_OVER, [Connect(A, T[0])]),
        (REFUSED, [MarkFailed(A, "Connection refused"), Choose((A,))]),
        (Chosen(B), [Connect(B, T[1])]),
        (NoSocket(10.0 + FD_WAIT + 1, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (WAIT_OVER, [Connect(B, T[1])]),
        (CONNECTED, [MarkSucceeded(B), Relay(B)]),
    ],
    "abort while connecting": [
        (Start(A), [Connect(A, T[0])]),
        (ABORT, [Reset(CANCELLED)]),
    ],
    "abort while waiting for fds": [
        (Start(A), [Connect(A, T[0])]),
        (NoSocket(1.0, True, EMFILE), [WaitForFds(FD_RETRY, EMFILE)]),
        (ABORT, [Reset(CANCELLED)]),
    ],
    "abort on a later attempt": [
        (Start(A), [Connect(A, T[0])]),
        (TIMED_OUT, [MarkFailed(A, "timed out"), Choose((A,))]),
        (Chosen(B), [Connect(B, T[1])]),
        (ABORT, [Reset(CANCELLED)]),
    ],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=CASES.keys())
def test_setup_script(steps: list[Step]) -> None:
    setup = ConnectionSetup()
    for i, (event, expected) in enumerate(steps):
        assert not setup.done, f"step {i}: the set-up ended early"
        assert setup.handle(event) == expected, f"step {i}: {event}"
    assert setup.done


# Events a state does not expect are a bug in the caller: refused loudly.
WRONG: dict[str, tuple[list[Event], Event]] = {
    "Connected before Start": ([], CONNECTED),
    "Chosen before Start": ([], Chosen(A)),
    "Start twice": ([Start(A)], Start(B)),
    "Chosen while connecting": ([Start(A)], Chosen(B)),
    "WaitOver while connecting": ([Start(A)], WAIT_OVER),
    "Connected while choosing": ([Start(A), REFUSED], CONNECTED),
    "TimedOut while waiting": ([Start(A), NoSocket(0.0, True, EMFILE)], TIMED_OUT),
    "anything after a relay": ([Start(A), CONNECTED], REFUSED),
    "abort after a relay": ([Start(A), CONNECTED], ABORT),
    "abort after a reset": ([Start(None)], ABORT),
}


@pytest.mark.parametrize(("before", "event"), WRONG.values(), ids=WRONG.keys())
def test_unexpected_event_is_refused(before: list[Event], event: Event) -> None:
    setup = ConnectionSetup()
    for e in before:
        setup.handle(e)
    with pytest.raises(ValueError, match="connection set-up"):
        setup.handle(event)


def test_timeouts_are_kube_proxys_and_count_the_attempts() -> None:
    assert CONNECT_TIMEOUTS == (0.25, 0.5, 1.0, 2.0)
    assert (FD_WAIT, FD_RETRY) == (2.0, 0.05)


def test_other_timeouts_give_other_attempt_counts() -> None:
    setup = ConnectionSetup(timeouts=(1.0, 3.0))
    assert setup.handle(Start(A)) == [Connect(A, 1.0)]
    assert setup.handle(REFUSED) == [MarkFailed(A, "Connection refused"), Choose((A,))]
    assert setup.handle(Chosen(B)) == [Connect(B, 3.0)]
    assert setup.handle(REFUSED) == [MarkFailed(B, "Connection refused"), Reset(ALL_FAILED)]
    assert setup.done and setup.tried == [A, B]
