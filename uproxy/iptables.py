"""The thin edge that runs iptables: save, restore, hooks, cleanup.

All rule text comes from :mod:`uproxy.rules`; this module only runs
``iptables-save``/``iptables-restore --noflush -w`` and the two hook checks.
One :class:`Iptables` per address family: ``Iptables(family=6)`` runs the
``ip6tables`` tools with the same chain, layout and comments.
"""

from __future__ import annotations

import logging
import shutil

from uproxy import filter_rules, rules
from uproxy.spawn import spawn

log = logging.getLogger("uproxy.iptables")


class IptablesError(Exception):
    """iptables failed; the message is one line for the user."""


class Iptables:
    def __init__(self, *, family: int = 4) -> None:
        self.family = family
        prefix = "ip6tables" if family == 6 else "iptables"
        self.cmd = prefix
        self.save_cmd = f"{prefix}-save"
        self.restore_cmd = f"{prefix}-restore"

    def missing_tool(self) -> str | None:
        for tool in (self.cmd, self.save_cmd, self.restore_cmd):
            if shutil.which(tool) is None:
                return tool
        return None

    async def unusable(self) -> str | None:
        """Why this family's nat table cannot be used here (tool missing, no nat table in
        the kernel), or None when it can."""
        missing = self.missing_tool()
        if missing is not None:
            return f"{missing} is not installed"
        try:
            await self.save()
        except (IptablesError, OSError) as exc:
            return str(exc)
        return None

    async def _run(self, *argv: str, stdin: str | None = None,
                   check: bool = True) -> tuple[int, str]:
        proc = await spawn(argv, stdin)
        out, err = proc.stdout, proc.stderr
        rc = proc.returncode or 0
        if check and rc != 0:
            first = (err.decode(errors="replace").strip().splitlines() or ["(no message)"])[0]
            raise IptablesError(f"{argv[0]} failed (exit {rc}): {first}")
        return rc, out.decode(errors="replace")

    async def save(self, table: str = "nat") -> str:
        _, out = await self._run(self.save_cmd, "-t", table)
        return out

    async def restore(self, text: str) -> None:
        await self._run(self.restore_cmd, "--noflush", "-w", "5", stdin=text)

    async def ensure_hooks(self) -> int:
        """Insert the jumps from PREROUTING and OUTPUT when missing; returns how many were added."""
        added = 0
        for builtin, spec in rules.HOOKS:
            rc, _ = await self._run(self.cmd, "-w", "5", "-t", "nat", "-C", builtin, *spec,
                                    check=False)
            if rc != 0:
                await self._run(self.cmd, "-w", "5", "-t", "nat", "-I", builtin, "1", *spec)
                added += 1
        return added

    async def cleanup(self) -> int:
        """Remove every uproxy hook and chain (also from a crashed run); returns rules removed."""
        text = await self.save()
        hooks = rules.hook_lines(text)
        for line in hooks:
            argv = line.split()
            argv[0] = "-D"
            # Restore-style quoting: the comment is one argument.
            await self._run(self.cmd, "-w", "5", "-t", "nat", *_unquote(argv), check=False)
        chains = rules.uproxy_chains(text)
        cleanup = rules.render_cleanup(chains)
        if cleanup:
            await self.restore(cleanup)
        return len(hooks) + len(chains) + await self._cleanup_filter()

    async def ensure_filter_hooks(self) -> int:
        """Insert the jumps to ``UPROXY-FIREWALL`` when missing; returns how many were added."""
        added = 0
        for builtin, spec in filter_rules.FILTER_HOOKS:
            rc, _ = await self._run(self.cmd, "-w", "5", "-t", "filter", "-C", builtin, *spec,
                                    check=False)
            if rc != 0:
                await self._run(self.cmd, "-w", "5", "-t", "filter", "-I", builtin, "1", *spec)
                added += 1
        return added

    async def _cleanup_filter(self) -> int:
        """The filter table's part of :meth:`cleanup` (:mod:`uproxy.filter_rules`)."""
        text = await self.save("filter")
        hooks = rules.hook_lines(text)
        for line in hooks:
            argv = line.split()
            argv[0] = "-D"
            await self._run(self.cmd, "-w", "5", "-t", "filter", *_unquote(argv), check=False)
        chains = rules.uproxy_chains(text)
        cleanup = filter_rules.render_filter_cleanup(chains)
        if cleanup:
            await self.restore(cleanup)
        return len(hooks) + len(chains)


def _unquote(argv: list[str]) -> list[str]:
    """Re-join a save line split on spaces where a quoted comment held spaces."""
    out: list[str] = []
    buf: list[str] | None = None
    for part in argv:
        if buf is not None:
            buf.append(part)
            if part.endswith('"'):
                out.append(" ".join(buf)[1:-1])
                buf = None
        elif part.startswith('"') and not (part.endswith('"') and len(part) > 1):
            buf = [part]
        elif part.startswith('"') and part.endswith('"'):
            out.append(part[1:-1])
        else:
            out.append(part)
    return out
