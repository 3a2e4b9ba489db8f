"""Shared fixtures: the loop x relay-path matrix and the namespace lab.

``flavor`` runs a test once per cell of (asyncio | uvloop) x (native | python), and
``native_flavor`` once per loop on the native path; the matrix itself is defined in
``support/matrix.py``, waits in ``support/waiting.py``.

Lab tests fail (never skip) without root or iproute2: CI runs as root, and a skip
would hide a broken setup. Such tests get the ``lab`` marker automatically, so
``-m "not lab"`` selects the rest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.support.matrix import FLAVORS, NATIVE_FLAVORS, Flavor, select_path
from uproxy.demo.lab import Lab

LAB_FIXTURES = frozenset({"lab", "lab_factory"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(params=FLAVORS, ids=str)
def flavor(request: pytest.FixtureRequest) -> Flavor:
    """Each (loop, relay path) in turn: the whole matrix."""
    return select_path(request.param)


@pytest.fixture(params=NATIVE_FLAVORS, ids=str)
def native_flavor(request: pytest.FixtureRequest) -> Flavor:
    """Each loop on the native path: for what only the native engine has."""
    return select_path(request.param)


def _require_lab_support() -> None:
    if os.geteuid() != 0:
        pytest.fail("the namespace lab needs root (run the lab tests as root, as CI does)",
                    pytrace=False)
    if shutil.which("ip") is None:
        pytest.fail("the namespace lab needs the 'ip' command (apt-get install iproute2)",
                    pytrace=False)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(pods=N)`` builds a lab; every lab built is torn down after the test.

    The logs of processes the labs spawned are printed at teardown (pytest shows
    them only when the test failed).
    """
    _require_lab_support()
    labs: list[Lab] = []

    def make(pods: int = 3, name_hint: str | None = None) -> Lab:
        lab = Lab.create(pods=pods, name_hint=name_hint)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            if not lab.torn_down:
                print(f"--- logs of {lab!r} ---\n{lab.logs()}")
            lab.teardown()


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    """A fresh lab with 3 pods (torn down after the test)."""
    return lab_factory(pods=3)
