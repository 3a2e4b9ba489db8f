"""The thin edge that runs ``nft``: probe, restore, list, cleanup.

All rule text comes from :mod:`uproxy.nftrules`; this module only runs the
``nft`` binary, one ``nft -f -`` (text on stdin, one netlink transaction) per
call, each bounded by a timeout. It touches uproxy's tables (``ip uproxy``,
``ip6 uproxy``) and a scratch table for the probe, nothing else.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from uproxy import nftrules
from uproxy.spawn import spawn

log = logging.getLogger("uproxy.nftables")

PROBE_TABLE = "uproxy_probe"


class NftablesError(Exception):
    """nft failed; the message is one line for the user."""


def _probe_text() -> str:
    """A scratch table with everything uproxy's tables use (concatenated map keys,
    element comments, nat base chains on both hooks, ``redirect`` through a map),
    created and deleted in one transaction: the kernel checks it all, nothing stays."""
    parts = []
    for family in (4, 6):
        fam = nftrules.family_keyword(family)
        body = nftrules.render([], family=family).split("\n", 2)[2]
        body = body.replace(f"table {fam} {nftrules.TABLE} {{",
                            f"table {fam} {PROBE_TABLE} {{", 1)
        parts += [f"table {fam} {PROBE_TABLE}", f"delete table {fam} {PROBE_TABLE}", body,
                  f"delete table {fam} {PROBE_TABLE}\n"]
    return "\n".join(parts)


class Nftables:
    """Runs ``cmd`` (``nft``) here, or inside network namespace ``netns`` (the lab, tests)."""

    def __init__(self, *, cmd: str = "nft", netns: str | None = None,
                 timeout: float = 30.0) -> None:
        self.cmd = cmd
        self.prefix = ("ip", "netns", "exec", netns) if netns else ()
        self.timeout = timeout

    async def _run(self, *args: str, stdin: str | None = None,
                   check: bool = True) -> tuple[int, str]:
        try:
            proc = await spawn((*self.prefix, self.cmd, *args), stdin, self.timeout)
        except OSError as exc:
            raise NftablesError(f"{self.cmd} cannot run: {exc.strerror or exc}") from None
        except subprocess.TimeoutExpired:  # (killed and reaped by subprocess.run)
            raise NftablesError(f"{self.cmd} {' '.join(args)} took more than "
                                f"{self.timeout:g}s (killed)") from None
        out, err = proc.stdout, proc.stderr
        rc = proc.returncode or 0
        if check and rc != 0:
            lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            first = next((ln for ln in lines if "Error:" in ln), lines[0] if lines else
                         "(no message)")
            raise NftablesError(f"{self.cmd} {' '.join(args)} failed (exit {rc}): {first}")
        return rc, out.decode(errors="replace")

    async def available(self) -> str | None:
        """None when ``nft`` runs and the kernel accepts a uproxy-shaped table, else why not."""
        if shutil.which(self.cmd) is None:
            return f"{self.cmd} not found (install the nftables package)"
        try:
            await self._run("-f", "-", stdin=_probe_text())
        except NftablesError as exc:
            return f"nftables unusable: {exc}"
        return None

    async def restore(self, text: str) -> None:
        """Apply ``text`` with one ``nft -f -`` (one transaction: all of it or nothing)."""
        if text:
            await self._run("-f", "-", stdin=text)

    async def tables(self) -> list[int]:
        """Families (4, 6) that have a uproxy table now.

        From ``nft list chains``, which names every table: ``list tables`` would fetch
        every set's elements first (nft 1.0.6: ~130 ms of nft's CPU with 10,000 Services
        in the map, against ~10 ms; every full sync asks)."""
        _, out = await self._run("list", "chains")
        return nftrules.uproxy_tables(out)

    async def list(self) -> str:
        """``nft list table`` text of uproxy's tables ("" when there are none)."""
        texts = []
        for family in await self.tables():
            rc, out = await self._run("list", "table", nftrules.family_keyword(family),
                                      nftrules.TABLE, check=False)
            if rc == 0:  # deleted between the two calls: nothing to show
                texts.append(out)
        return "".join(texts)

    async def cleanup(self) -> int:
        """Delete uproxy's tables (``ip`` and ``ip6``) if present; returns how many were removed."""
        present = await self.tables()
        if present:
            await self.restore(nftrules.render_cleanup(present))
            log.info("removed nftables tables: %s",
                     ", ".join(f"{nftrules.family_keyword(f)} {nftrules.TABLE}" for f in present))
        return len(present)
