"""A PATH of the node's own tools for a daemon under test: what it finds there is what a
node with exactly those tools (or a wrapped one) would give it."""

from __future__ import annotations

import shutil
from pathlib import Path

# What the daemon runs besides nft (which a test leaves out or wraps).
NODE_TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save",
              "ip6tables-restore", "conntrack", "ip")


def tools_dir(where: Path, tools: tuple[str, ...] = NODE_TOOLS) -> Path:
    """A new directory ``where`` with a link to each of ``tools`` (all must be installed)."""
    where.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found is not None, tool
        (where / tool).symlink_to(found)
    return where
