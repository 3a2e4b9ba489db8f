"""Running ``uproxy run`` inside a lab's node namespace (for the tests, the demo and the bench).

:class:`NodeProxy` writes manifests into a directory the daemon watches, starts
the daemon as a real process in the node namespace, and waits by looking at
what a user would look at: the rules (``nft list table ip uproxy`` with the
default nftables interception, ``iptables-save`` with ``--interception
iptables``) and the health endpoint — never by sleeping a fixed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from uproxy import nftrules
from uproxy.demo.lab import Lab, LabError
from uproxy.rules import parse_rules


class NodeProxy:
    def __init__(self, lab: Lab, *, loop: str = "uvloop", native: bool = True,
                 args: Iterable[str] = (), name: str = "uproxy",
                 prefix: Iterable[str] = (), source: Path | None = None) -> None:
        self.lab = lab
        # Another uproxy source tree to run (the bench's baseline): ``-m uproxy`` from there.
        self.source = source
        self._help: str | None = None
        self.loop = loop
        self.native = native
        self.args = list(args)
        self.prefix = list(prefix)  # e.g. ["prlimit", "--nofile=64:64"]
        self.name = name
        self.manifests = lab.workdir / f"{name}-manifests"
        self.manifests.mkdir(exist_ok=True)
        # Its own takeover socket: never another lab's uproxy (they share the filesystem).
        self.state_dir = lab.workdir / f"{name}-state"
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._nft_usable: bool | None = None

    @property
    def interception(self) -> str:
        """``nftables`` or ``iptables``: what the daemon uses with these args (as its auto does)."""
        mode = "auto"
        if "--interception" in self.args:
            mode = self.args[self.args.index("--interception") + 1]
        if mode == "auto":
            if self._nft_usable is None:
                self._nft_usable = shutil.which("nft") is not None and self.lab.run(
                    "node", ["nft", "list", "tables"], check=False).returncode == 0
            mode = "nftables" if self._nft_usable else "iptables"
        return mode

    # Manifests ---------------------------------------------------------------------------
    def write(self, filename: str, *objects: Mapping[str, Any]) -> Path:
        """Write (or replace, atomically) one manifest file with these objects."""
        path = self.manifests / filename
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False))
        os.replace(tmp, path)
        return path

    def write_text(self, filename: str, text: str) -> Path:
        path = self.manifests / filename
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def remove(self, filename: str) -> None:
        (self.manifests / filename).unlink()

    # Process ------------------------------------------------------------------------------
    def start(self, *, wait_for: str | None = None, timeout: float = 15.0) -> None:
        env = {} if self.native else {"UPROXY_NO_NATIVE": "1"}
        argv = [*self.prefix, sys.executable, "-m", "uproxy", "run",
                "--manifests", str(self.manifests), "--loop", self.loop,
                "--hostname-override", "node",
                "--status-address", "127.0.0.1:10249", "--healthz-address", "127.0.0.1:10256",
                *(("--state-dir", str(self.state_dir)) if self.knows("--state-dir") else ()),
                *self.args]
        self._starts += 1
        self.proc = self.lab.spawn("node", argv, f"{self.name}-{self._starts}", env=env,
                                   cwd=self.source)
        self.wait_ready(timeout=timeout)
        if wait_for is not None:
            self.wait_rules(lambda text: wait_for in text, timeout=timeout, family=None)

    def knows(self, flag: str) -> bool:
        """Whether this uproxy's ``run`` takes ``flag``: always for this checkout; for a
        :attr:`source` tree, what its ``uproxy run --help`` lists (an older uproxy lacks
        some of the flags :meth:`start` passes)."""
        if self.source is None:
            return True
        if self._help is None:
            out = subprocess.run([sys.executable, "-m", "uproxy", "run", "--help"],
                                 cwd=self.source, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise LabError(f"uproxy in {self.source} does not start: "
                               f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
            self._help = out.stdout
        return flag in self._help.split()

    def upgrade(self, *, timeout: float = 15.0) -> int:
        """Start a new uproxy beside the running one, which hands it every socket and exits.

        Returns the old process's exit code once the new one answers ``/readyz``.
        """
        old = self.proc
        assert old is not None and old.poll() is None, "nothing running to upgrade"
        self.start(timeout=timeout)
        try:  # (it drains for up to the shutdown grace, 5 s, and is gone 5 s after that)
            code = old.wait(timeout + 10.0)
        except subprocess.TimeoutExpired:
            raise LabError(f"the old uproxy did not exit after the takeover:\n"
                           f"{self.lab.log(f'{self.name}-{self._starts - 1}')}") from None
        self.wait_ready(timeout=timeout)  # the new one's answer now, the old one's socket is gone
        return code

    def ready(self) -> bool:
        """``/readyz`` of the running daemon answers 200 (first sync done, rules applied)."""
        result = self.lab.run("node", ["curl", "-sf", "-m", "2", "http://127.0.0.1:10256/readyz"],
                              check=False)
        return result.returncode == 0

    def wait_ready(self, *, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"uproxy exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise LabError(f"uproxy not ready after {timeout}s:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.lab.log(f"{self.name}-{self._starts}")

    def iptables_save(self, family: int | None = 4) -> str:
        """The node's nat table: IPv4 (``iptables-save``), IPv6 (``ip6tables-save``) or,
        with ``family=None``, both one after the other."""
        families = (4, 6) if family is None else (family,)
        return "".join(
            self.lab.run("node", ["ip6tables-save" if f == 6 else "iptables-save",
                                  "-t", "nat"]).stdout for f in families)

    def nft_tables(self, family: int | None = 4) -> str:
        """``nft list table ip uproxy`` (``ip6`` for 6, both for None); "" for a missing table."""
        if shutil.which("nft") is None:
            return ""
        families = (4, 6) if family is None else (family,)
        return "".join(
            self.lab.run("node", ["nft", "list", "table", nftrules.family_keyword(f),
                                  nftrules.TABLE], check=False).stdout for f in families)

    def rules_text(self, family: int | None = 4) -> str:
        """The interception rules as the node shows them: the nft table or the nat table."""
        if self.interception == "nftables":
            return self.nft_tables(family)
        return self.iptables_save(family)

    def redirects(self, family: int | None = 4) -> list[tuple[str, str, int, str, int]]:
        """``(comment, address, port, PROTOCOL, to_port)`` of every redirect in place."""
        return self.parse(self.rules_text(family))

    def parse(self, text: str) -> list[tuple[str, str, int, str, int]]:
        """:meth:`redirects` of a :meth:`rules_text` (e.g. the one ``wait_rules`` got)."""
        if self.interception == "nftables":
            return nftrules.parse_elements(text)
        return parse_rules(text)

    def uproxy_lines(self) -> list[str]:
        """uproxy's rules and chains in either family's nat table, and its nft tables' lines."""
        return [line for line in self.iptables_save(None).splitlines() if "UPROXY" in line] + [
            line for line in self.nft_tables(None).splitlines() if line.strip()]

    def wait_rules(self, predicate: Callable[[str], bool], *, timeout: float = 10.0,
                   family: int | None = 4) -> str:
        """Wait until ``predicate`` holds for :meth:`rules_text` (nft or iptables)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.rules_text(family)
            if predicate(text):
                return text
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"uproxy exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise LabError(f"rules not as expected after {timeout}s:\n{text}\n{self.log}")
            time.sleep(0.1)

    def wait_log(self, needle: str, *, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.log:
            if time.monotonic() > deadline:
                raise LabError(f"{needle!r} not logged after {timeout}s:\n{self.log}")
            time.sleep(0.05)
        return self.log

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise LabError(f"uproxy did not stop within {timeout}s:\n{self.log}") from None


def service(name: str, cluster_ip: str, ports: list[dict[str, Any]], *,
            namespace: str = "default", **spec: Any) -> dict[str, Any]:
    status = spec.pop("status", None)
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": cluster_ip, "ports": ports, **spec},
    }
    if status is not None:
        obj["status"] = status
    return obj


def endpoint_slice(service_name: str, addresses: Iterable[str], ports: list[dict[str, Any]], *,
                   namespace: str = "default", name: str | None = None,
                   conditions: Mapping[str, Mapping[str, bool]] | None = None,
                   node_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    endpoints = []
    addresses = list(addresses)
    address_type = "IPv6" if addresses and ":" in addresses[0] else "IPv4"
    for ip in addresses:
        ep: dict[str, Any] = {"addresses": [ip],
                              "conditions": dict((conditions or {}).get(ip, {"ready": True}))}
        if node_names and ip in node_names:
            ep["nodeName"] = node_names[ip]
        endpoints.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-slice", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type, "ports": ports, "endpoints": endpoints,
    }
