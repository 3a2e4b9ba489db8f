"""Which Services are ours (kube-proxy's informer selector, issue 14).

kube-proxy watches Services with ``!service.kubernetes.io/service-proxy-name,
!service.kubernetes.io/headless``, and skips ExternalName and headless (clusterIP None)
Services. uproxy applies the same rule in the store, so a label added or removed at run
time is an ordinary change: the service's entries go or come back. ``--service-proxy-name
NAME`` (an extension: kube-proxy has no such flag) turns the rule around: only Services
labelled with NAME are served.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from uproxy.model import HEADLESS_LABEL, PROXY_NAME_LABEL, ServicePortName, parse_service
from uproxy.state import Served, Store

WEB = ServicePortName("default", "web", "http", "TCP")


def service(labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": "default"}
    if labels is not None:
        meta["labels"] = labels
    return {"kind": "Service", "metadata": meta,
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}],
                     **spec}}


SLICE = {"kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
         "endpoints": [{"addresses": ["10.0.0.1"]}]}


@pytest.mark.parametrize(("labels", "proxy_name", "served"), [
    (None, None, True),
    ({"app": "web"}, None, True),
    ({PROXY_NAME_LABEL: "foo-bar"}, None, False),  # another proxy's
    ({PROXY_NAME_LABEL: ""}, None, False),  # the selector is DoesNotExist: any value
    ({PROXY_NAME_LABEL: "uproxy"}, "uproxy", True),
    ({PROXY_NAME_LABEL: "other"}, "uproxy", False),
    (None, "uproxy", False),  # with the flag, only labelled Services
    ({"app": "web"}, "uproxy", False),
    ({HEADLESS_LABEL: ""}, None, False),
    ({HEADLESS_LABEL: "", PROXY_NAME_LABEL: "uproxy"}, "uproxy", False),
    (None, "", True),  # an empty flag means unset
])
def test_which_services_are_served(labels: dict[str, str] | None, proxy_name: str | None,
                                   served: bool) -> None:
    store = Store(proxy_name=proxy_name)
    store.apply("Service", service(labels))
    store.apply("EndpointSlice", SLICE)
    assert (WEB in store.table()) is served


@pytest.mark.parametrize("spec", [
    {"type": "ExternalName", "externalName": "example.com", "clusterIP": ""},
    {"clusterIP": "None"},
])
def test_external_name_and_headless_are_not_proxied(spec: dict[str, Any]) -> None:
    parsed = parse_service(service(**spec))
    assert parsed.ports == [] and parsed.problems == [] and parsed.skipped


def test_headless_label_on_a_service_with_a_cluster_ip_is_skipped() -> None:
    parsed = parse_service(service({HEADLESS_LABEL: ""}))
    assert parsed.ports == [] and parsed.problems == []
    assert HEADLESS_LABEL in parsed.skipped[0]


@pytest.mark.parametrize(("label", "proxy_name"), [
    ({PROXY_NAME_LABEL: "foo-bar"}, None),  # e2e: should implement ...service-proxy-name
    ({HEADLESS_LABEL: ""}, None),  # e2e: should implement ...headless
    ({PROXY_NAME_LABEL: "uproxy"}, "other"),
])
def test_adding_and_removing_the_label_stops_and_starts_proxying(
    label: dict[str, str], proxy_name: str | None
) -> None:
    store = Store(proxy_name=proxy_name)
    served = Served()
    # with the flag, "plain" is a Service labelled with our name
    plain = service({"app": "web"} if proxy_name is None
                    else {"app": "web", PROXY_NAME_LABEL: proxy_name})
    labelled = copy.deepcopy(plain)
    labelled["metadata"]["labels"].update(label)
    store.apply("Service", plain)
    store.apply("EndpointSlice", SLICE)
    diff = served.update(store, store.take_changed())
    assert [e.port.name for e in diff.added] == [WEB]
    store.apply("Service", labelled)
    diff = served.update(store, store.take_changed())
    assert [e.port.name for e in diff.removed] == [WEB] and WEB not in served.table
    store.apply("Service", plain)
    diff = served.update(store, store.take_changed())
    assert [e.port.name for e in diff.added] == [WEB] and WEB in served.table
    assert [str(e) for e in served.table[WEB].endpoints] == ["10.0.0.1:8080"]
