"""The takeover format and both sides' steps (uproxy/takeover.py), every branch without a socket."""

from __future__ import annotations

import pytest

from uproxy.takeover import (
    EXIT_FAILED,
    EXIT_REFUSED,
    MAX_FDS_PER_MESSAGE,
    VERSION,
    Adopt,
    Batch,
    ConfirmOwned,
    Connected,
    Exit,
    Failed,
    FrameDecoder,
    FrameError,
    Giver,
    Hello,
    Item,
    NoPeer,
    Offer,
    Owned,
    PauseAndOffer,
    Refuse,
    Refused,
    Release,
    Released,
    Resume,
    SendHello,
    Sent,
    StartFresh,
    Taker,
    assign,
    batches,
    encode,
    pack_bytes,
    unpack_bytes,
)

NS = "net:[4026531840]"


# Frames --------------------------------------------------------------------------------------
def test_frames_survive_any_split() -> None:
    messages = [{"type": "hello", "version": 1}, {"type": "offer", "items": [{"k": "é"}]}]
    wire = b"".join(encode(m) for m in messages)
    for step in (1, 3, len(wire)):
        decoder = FrameDecoder()
        out = []
        for at in range(0, len(wire), step):
            out += decoder.feed(wire[at:at + step])
        assert out == messages
        assert decoder.pending == 0


def test_a_frame_that_is_not_json_or_has_no_type_is_an_error() -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(b"\x00\x00\x00\x02{]")
    with pytest.raises(FrameError):
        FrameDecoder().feed(encode({"no": "type"}))
    with pytest.raises(FrameError):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_fds_go_in_batches_of_at_most_253() -> None:
    assert MAX_FDS_PER_MESSAGE == 253
    assert batches(0) == []
    assert batches(253) == [253]
    assert batches(254) == [253, 1]
    assert batches(20_001) == [253] * 79 + [20_001 - 253 * 79]
    assert sum(batches(20_001)) == 20_001
    with pytest.raises(ValueError):
        batches(-1)


def test_items_take_their_fds_in_order_and_the_counts_must_add_up() -> None:
    items = [Item("listener", {"port": 1}), Item("tcp", {"up": 5}, fds=2), Item("server")]
    assert [fds for _, fds in assign(items, [10, 11, 12, 13])] == [[10], [11, 12], [13]]
    with pytest.raises(FrameError):
        assign(items, [10, 11, 12])
    assert Item.from_dict(items[1].as_dict()) == items[1]
    with pytest.raises(FrameError):
        Item.from_dict({"fds": 1})


def test_in_flight_bytes_travel_as_text() -> None:
    data = bytes(range(256)) * 3
    assert unpack_bytes(pack_bytes(data)) == data


# The old process ------------------------------------------------------------------------------
def test_old_hands_over_and_releases_after_the_new_owns_everything() -> None:
    giver = Giver(NS)
    assert giver.handle(Hello(VERSION, NS)) == [PauseAndOffer()]
    assert giver.handle(Sent(7)) == []
    assert giver.handle(Owned(7)) == [Release()]
    assert giver.state == "released"


def test_old_refuses_another_version_and_keeps_serving() -> None:
    giver = Giver(NS)
    [action] = giver.handle(Hello(VERSION + 1, NS))
    assert isinstance(action, Refuse) and "format 2" in action.reason
    assert giver.state == "serving"


def test_old_refuses_a_peer_in_another_network_namespace() -> None:
    giver = Giver(NS)
    [action] = giver.handle(Hello(VERSION, "net:[1]"))
    assert isinstance(action, Refuse) and "namespace" in action.reason
    assert giver.state == "serving"


def test_old_refuses_a_second_takeover_while_one_runs() -> None:
    giver = Giver(NS)
    giver.handle(Hello(VERSION, NS))
    [action] = giver.handle(Hello(VERSION, NS))
    assert isinstance(action, Refuse)
    assert giver.state == "offering"


@pytest.mark.parametrize("sent", [False, True])
def test_old_resumes_when_the_new_fails_half_way(sent: bool) -> None:
    giver = Giver(NS)
    giver.handle(Hello(VERSION, NS))
    if sent:
        giver.handle(Sent(3))
    assert giver.handle(Failed("peer gone")) == [Resume("peer gone")]
    assert giver.state == "serving"
    # ... and can be taken over later.
    assert giver.handle(Hello(VERSION, NS)) == [PauseAndOffer()]


def test_old_resumes_when_the_new_owns_fewer_fds_than_sent() -> None:
    giver = Giver(NS)
    giver.handle(Hello(VERSION, NS))
    giver.handle(Sent(5))
    [action] = giver.handle(Owned(4))
    assert isinstance(action, Resume) and "4 of 5" in action.reason
    assert giver.state == "serving"


def test_old_ignores_what_does_not_belong_to_its_state() -> None:
    giver = Giver(NS)
    assert giver.handle(Failed("a peer that never said hello")) == []
    assert giver.handle(Sent(1)) == []
    assert giver.handle(Owned(1)) == []
    assert giver.state == "serving"


# The new process ------------------------------------------------------------------------------
def _offer(*fd_counts: int) -> Offer:
    items = tuple(Item("tcp", fds=n) for n in fd_counts)
    return Offer(items, sum(fd_counts))


def test_new_takes_over_in_batches_and_adopts_after_released() -> None:
    taker = Taker(NS)
    assert taker.handle(Connected()) == [SendHello(VERSION, NS)]
    assert taker.handle(_offer(*[2] * 200)) == []
    assert taker.handle(Batch(253)) == []
    assert taker.handle(Batch(147)) == [ConfirmOwned(400)]
    assert taker.handle(Released()) == [Adopt()]
    assert taker.state == "adopted"


def test_new_with_nothing_offered_confirms_at_once() -> None:
    taker = Taker(NS)
    taker.handle(Connected())
    assert taker.handle(Offer((), 0)) == [ConfirmOwned(0)]


@pytest.mark.parametrize("stale", [False, True])
def test_new_starts_fresh_when_nobody_runs(stale: bool) -> None:
    taker = Taker(NS)
    assert taker.handle(NoPeer(stale)) == [StartFresh(remove_stale=stale)]


def test_new_exits_2_when_refused() -> None:
    taker = Taker(NS)
    taker.handle(Connected())
    [action] = taker.handle(Refused("handover format 2 is not this uproxy's 1"))
    assert isinstance(action, Exit) and action.code == EXIT_REFUSED
    assert "\n" not in action.line and "format 2" in action.line


@pytest.mark.parametrize("after", ["hello", "offer", "batch"])
def test_new_exits_1_when_the_old_fails_before_owned(after: str) -> None:
    taker = Taker(NS)
    taker.handle(Connected())
    if after in ("offer", "batch"):
        taker.handle(_offer(2, 1))
    if after == "batch":
        taker.handle(Batch(2))
    [action] = taker.handle(Failed("the running uproxy closed the connection"))
    assert isinstance(action, Exit) and action.code == EXIT_FAILED
    assert "keeps serving" in action.line


def test_new_does_not_adopt_when_the_old_vanishes_after_owned() -> None:
    taker = Taker(NS)
    taker.handle(Connected())
    taker.handle(_offer(1))
    taker.handle(Batch(1))
    [action] = taker.handle(Failed("closed"))
    assert isinstance(action, Exit) and action.code == EXIT_FAILED
    assert "not serving its sockets twice" in action.line


def test_new_exits_when_more_fds_arrive_than_offered() -> None:
    taker = Taker(NS)
    taker.handle(Connected())
    taker.handle(_offer(1))
    [action] = taker.handle(Batch(2))
    assert isinstance(action, Exit) and action.code == EXIT_FAILED


def test_new_exits_on_an_offer_whose_counts_do_not_add_up() -> None:
    taker = Taker(NS)
    taker.handle(Connected())
    [action] = taker.handle(Offer((Item("tcp", fds=2),), 3))
    assert isinstance(action, Exit) and action.code == EXIT_FAILED


@pytest.mark.parametrize("event", [Released(), Batch(1), _offer(1)])
def test_new_exits_on_a_step_out_of_order(event: Released | Batch | Offer) -> None:
    taker = Taker(NS)
    taker.handle(Connected())
    if not isinstance(event, Offer):
        [action] = taker.handle(event)
        assert isinstance(action, Exit) and "unexpected" in action.line
    else:
        taker.handle(event)
        [action] = taker.handle(_offer(1))
        assert isinstance(action, Exit) and "unexpected" in action.line


def test_new_ignores_a_failure_once_it_is_done() -> None:
    taker = Taker(NS)
    taker.handle(NoPeer(False))
    assert taker.handle(Failed("late")) == []
