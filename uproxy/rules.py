"""Pure rule rendering: the desired redirects -> ``iptables-restore`` text.

uproxy owns one nat chain, ``UPROXY-SERVICES``, hooked once from
``PREROUTING`` (traffic from pods and other hosts) and ``OUTPUT`` (traffic from
the node itself). Each ClusterIP, externalIP and LoadBalancer IP of each
service port gets one ``REDIRECT`` rule to that port's proxy socket, commented
``namespace/name:port`` the way kube-proxy comments its rules, so
``iptables-save | grep NAME`` reads like the tutorials.

The whole chain is written with one ``iptables-restore --noflush`` per sync:
declaring the chain flushes it, so the table is replaced atomically and rules
someone deleted come back at the next sync. Hooks in the built-in chains are
part of the restore text only right after a cleanup removed them (``--noflush``
would otherwise add duplicates); later the runner checks and inserts them
separately (:data:`HOOKS`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from uproxy.model import ServicePortName, quick_init

CHAIN = "UPROXY-SERVICES"
CHAIN_PREFIX = "UPROXY-"
HOOK_COMMENT = "uproxy service portals"
HOOKS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (builtin, ("-m", "comment", "--comment", HOOK_COMMENT, "-j", CHAIN))
    for builtin in ("PREROUTING", "OUTPUT")
)

KIND_CLUSTER = "cluster IP"
KIND_EXTERNAL = "external IP"
KIND_LOADBALANCER = "loadbalancer IP"

# With iptables-nft, once the nat table holds no NAT target at all, packets of
# connections that were already REDIRECTed stop being translated and the open
# connections die (seen on this kernel: flush the last REDIRECT rule and an open
# connection hangs). So uproxy's chain always ends with one NAT rule that can
# never match (nobody connects *to* the broadcast/unspecified address), which
# keeps open connections alive when the last service goes away and during the
# shutdown grace period.
KEEP_NAT_COMMENT = "uproxy keeps NAT of open connections (matches nothing)"
KEEP_NAT_V4 = (
    f"-A {CHAIN} -d 255.255.255.255/32 -p tcp "
    f'-m comment --comment "{KEEP_NAT_COMMENT}" -m tcp --dport 1 -j REDIRECT --to-ports 1'
)
KEEP_NAT_V6 = KEEP_NAT_V4.replace("255.255.255.255/32", "::/128")

_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:/@+=,-]")


@quick_init
@dataclass(frozen=True, slots=True, order=True)
class Redirect:
    """One interception rule: ``address:port/protocol`` -> the local proxy port."""

    name: ServicePortName
    kind: str
    address: str
    port: int
    protocol: str
    to_port: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def comment(self) -> str:
        return safe_comment(f"{self.name} {self.kind}")


def _order(r: Redirect) -> tuple[str, str, str, str, str, str, int, str, int]:
    """The dataclass order of a Redirect as one tuple: a key function sorts many times
    faster than the generated comparison methods (``bench/ANALYSIS.md``, "uproxy/rules.py")."""
    n = r.name
    return (n.namespace, n.name, n.port, n.protocol, r.kind, r.address, r.port, r.protocol,
            r.to_port)


def safe_comment(text: str) -> str:
    """Comments go inside double quotes in restore text: keep them harmless and short."""
    return _UNSAFE.sub("_", text)[:200]


def render_rule(r: Redirect) -> str:
    proto = r.protocol.lower()
    prefix = 128 if r.family == 6 else 32
    return (
        f"-A {CHAIN} -d {r.address}/{prefix} -p {proto} "
        f'-m comment --comment "{r.comment}" -m {proto} --dport {r.port} '
        f"-j REDIRECT --to-ports {r.to_port}"
    )


def render(redirects: Iterable[Redirect], *, family: int = 4,
           stale_chains: Iterable[str] = (), hooks: bool = False) -> str:
    """The complete ``nat`` restore text for one address family.

    ``stale_chains`` are uproxy chains found on the node that this version no
    longer uses (a crashed older run); they are flushed and deleted. ``hooks``
    also inserts the jumps from the built-in chains: only for a node known to
    have none (just cleaned up), since each restore would add them again.
    """
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    stale = sorted(c for c in set(stale_chains) if c.startswith(CHAIN_PREFIX) and c != CHAIN)
    lines.extend(f":{c} - [0:0]" for c in stale)
    lines.extend(render_rule(r) for r in sorted(redirects, key=_order)
                 if r.family == family)
    lines.append(KEEP_NAT_V6 if family == 6 else KEEP_NAT_V4)
    lines.extend(f"-X {c}" for c in stale)
    if hooks:
        lines.extend(render_hook(builtin, spec) for builtin, spec in HOOKS)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_hook(builtin: str, spec: tuple[str, ...]) -> str:
    """``-I`` restore line for one hook (first in its chain, as ``iptables -I`` puts it)."""
    words = [f'"{w}"' if " " in w else w for w in spec]
    return f"-I {builtin} 1 " + " ".join(words)


def render_cleanup(chains: Iterable[str]) -> str:
    """Restore text that flushes and deletes the given uproxy chains (hooks removed first)."""
    own = sorted(c for c in set(chains) if c.startswith(CHAIN_PREFIX))
    if not own:
        return ""
    lines = ["*nat", *(f":{c} - [0:0]" for c in own), *(f"-X {c}" for c in own), "COMMIT"]
    return "\n".join(lines) + "\n"


_RULE = re.compile(
    r'^-A (?P<chain>\S+) -d (?P<addr>[0-9a-fA-F:.]+)/\d+ -p (?P<proto>\w+) '
    r'-m comment --comment "(?P<comment>[^"]*)" -m \w+ --dport (?P<port>\d+) '
    r"-j REDIRECT --to-ports (?P<to>\d+)$"
)


def parse_rules(text: str) -> list[tuple[str, str, int, str, int]]:
    """Read back ``(comment, address, port, protocol, to_port)`` from restore or save text."""
    out = []
    for line in text.splitlines():
        m = _RULE.match(line.strip())
        if m and m["chain"] == CHAIN and m["comment"] != KEEP_NAT_COMMENT:
            out.append((m["comment"], m["addr"], int(m["port"]), m["proto"].upper(), int(m["to"])))
    return out


def uproxy_chains(save_text: str) -> set[str]:
    """Chains named ``UPROXY-*`` in ``iptables-save`` output."""
    return {
        line[1:].split()[0]
        for line in save_text.splitlines()
        if line.startswith(":" + CHAIN_PREFIX)
    }


def hook_lines(save_text: str) -> list[str]:
    """Rules in built-in chains that jump to uproxy chains (to delete on cleanup)."""
    out = []
    for line in save_text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] == "-A" and not parts[1].startswith(CHAIN_PREFIX) and (
            "-j" in parts and parts[parts.index("-j") + 1].startswith(CHAIN_PREFIX)
        ):
            out.append(line)
    return out
