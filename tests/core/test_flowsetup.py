"""The UDP new-flow / refused-flow decisions (uproxy.flowsetup), every branch, no socket."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import pytest

from uproxy.flowsetup import (
    Action,
    BackendFailed,
    Choose,
    Chosen,
    Close,
    Drop,
    Established,
    Event,
    Evict,
    FlowSetup,
    Log,
    MarkFailed,
    NewClient,
    Open,
    Opened,
    OpenFailed,
    Retry,
)
from uproxy.model import Endpoint

EP = Endpoint("10.244.1.7", 53)
SVC = "default/dns:dns"


@dataclass(frozen=True)
class Victim:
    name: str


OLD = Victim("idle flow")


def refused(**kw: bool) -> BackendFailed:
    return BackendFailed(EP, errno.ECONNREFUSED, "Connection refused", SVC, **kw)


def other(**kw: bool) -> BackendFailed:
    return BackendFailed(EP, errno.EHOSTUNREACH, "No route to host", SVC, **kw)


REFUSED_LOG = Log(logging.DEBUG, f"{SVC}: {EP} refused a datagram (port unreachable)")
OTHER_LOG = Log(logging.INFO, f"{SVC}: relaying to {EP} failed: No route to host")
FDS_LOG = Log(logging.WARNING, "out of file descriptors for UDP flows (Too many open files, "
                               "7 flows); dropping new flows")
EMFILE = OpenFailed(EP, errno.EMFILE, "Too many open files", 7)

CASES: list[tuple[str, Event[Victim], list[Action[Victim]]]] = [
    # a client's first datagram
    ("no service port", NewClient(False, False), [Drop("no_service")]),
    ("no service port, table full", NewClient(False, True, OLD), [Drop("no_service")]),
    ("room in the table", NewClient(True, False), [Choose()]),
    ("full, everyone active", NewClient(True, True, None), [Drop("table_full")]),
    ("full, an idle victim", NewClient(True, True, OLD), [Evict(OLD), Choose()]),
    # the balancer's answer
    ("no usable endpoint", Chosen(None), [Drop("no_endpoints")]),
    ("an endpoint", Chosen(EP), [Open(EP)]),
    # the backend socket
    ("socket open", Opened(EP), [Established(EP)]),
    ("out of descriptors (EMFILE)", EMFILE, [FDS_LOG, Drop("no_fds")]),
    ("out of buffers (ENOBUFS)", OpenFailed(EP, errno.ENOBUFS, "x", 1),
     [Log(logging.WARNING, "out of file descriptors for UDP flows (x, 1 flows); "
                           "dropping new flows"), Drop("no_fds")]),
    ("other open error: the endpoint is avoided", OpenFailed(EP, errno.ENETUNREACH, "x", 1),
     [MarkFailed(EP), Drop("connect_failed")]),
    # an existing flow's backend fails
    ("refused with a datagram unsent: retry it", refused(unsent=True),
     [MarkFailed(EP, refused=True), REFUSED_LOG, Close("endpoint refused"), Retry()]),
    ("refused after every datagram went (or on receive)", refused(),
     [MarkFailed(EP, refused=True), REFUSED_LOG, Close("endpoint refused")]),
    ("the retry refused too: no second retry", refused(unsent=True, retried=True),
     [MarkFailed(EP, refused=True), REFUSED_LOG, Close("endpoint refused")]),
    ("another error, datagram unsent", other(unsent=True),
     [OTHER_LOG, Close("No route to host"), Retry()]),
    ("another error on receive", other(), [OTHER_LOG, Close("No route to host")]),
    ("another error on the retry", other(unsent=True, retried=True),
     [OTHER_LOG, Close("No route to host")]),
    ("flow closed already: only the retry is left", refused(unsent=True, closed=True),
     [Retry()]),
    ("flow closed already, nothing unsent", refused(closed=True), []),
]


@pytest.mark.parametrize(("event", "actions"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_event_gives_its_actions(event: Event[Victim], actions: list[Action[Victim]]) -> None:
    assert FlowSetup[Victim]().handle(event) == actions


def test_out_of_fds_warns_once_until_a_flow_opens() -> None:
    setup: FlowSetup[Victim] = FlowSetup()
    assert setup.handle(EMFILE) == [FDS_LOG, Drop("no_fds")]
    assert setup.handle(EMFILE) == [Drop("no_fds")]  # still out: counted, not logged again
    assert setup.handle(OpenFailed(EP, errno.EACCES, "x", 7)) == [MarkFailed(EP),
                                                                 Drop("connect_failed")]
    assert setup.handle(EMFILE) == [Drop("no_fds")]
    assert setup.handle(Opened(EP)) == [Established(EP)]  # descriptors again
    assert setup.handle(EMFILE) == [FDS_LOG, Drop("no_fds")]


def test_a_whole_set_up_from_eviction_to_established() -> None:
    """The sequence UdpProxy drives: each request answered by the next event."""
    setup: FlowSetup[Victim] = FlowSetup()
    assert setup.handle(NewClient(True, True, OLD)) == [Evict(OLD), Choose()]
    assert setup.handle(Chosen(EP)) == [Open(EP)]
    assert setup.handle(Opened(EP)) == [Established(EP)]


def test_a_refused_datagram_is_retried_once_on_a_new_flow() -> None:
    setup: FlowSetup[Victim] = FlowSetup()
    first = setup.handle(refused(unsent=True))
    assert first[-1] == Retry()
    assert setup.handle(NewClient(True, False)) == [Choose()]  # the retry's flow
    assert setup.handle(Chosen(EP)) == [Open(EP)]
    assert setup.handle(Opened(EP)) == [Established(EP)]
    assert Retry() not in setup.handle(refused(unsent=True, retried=True))


def test_not_an_event() -> None:
    with pytest.raises(TypeError):
        FlowSetup[Victim]().handle(object())  # type: ignore[arg-type]
