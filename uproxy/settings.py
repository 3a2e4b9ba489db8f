"""One typed settings tree: flags > environment (``UPROXY_*``) > config file > defaults.

Every field has a docstring-like comment and a default; :func:`load` merges
the layers and raises :class:`SettingsError` with one line naming the bad
value and where it came from. Settings are passed explicitly, never read from
a global.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml


class SettingsError(Exception):
    """A bad flag, environment variable or config value: one line for the user."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """``250ms``, ``30s``, ``3h``, ``1.5m`` or a bare number of seconds -> seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise ValueError(f"{text!r} is not a duration (like 250ms, 30s, 3h)")
        value = float(m[1]) * _UNITS[m[2]]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite duration")
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return value


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_port_range(text: str) -> tuple[int, int] | None:
    if text in ("", "0", "0-0"):
        return None
    low, sep, high = text.partition("-")
    if not sep:
        high = low
    if not (low.isascii() and low.isdigit() and high.isascii() and high.isdigit()):
        raise ValueError(f"{text!r} is not LOW-HIGH")
    lo, hi = int(low), int(high)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{text!r} is not a port range within 1-65535")
    return lo, hi


def parse_cidrs(text: str) -> tuple[str, ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        out.append(str(ipaddress.ip_network(part, strict=False)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Settings:
    # Manifest files or directories (the files source); empty means the API source.
    manifests: tuple[str, ...] = ()
    # kubeconfig for the API source (else $KUBECONFIG, else in-cluster).
    kubeconfig: str | None = None
    # API server URL overriding the kubeconfig's.
    master: str | None = None
    # This node's name, for Local traffic policies and the Node watch.
    hostname_override: str = field(default_factory=socket.gethostname)
    # Address the proxy sockets bind to (REDIRECT targets).
    bind_address: str = "0.0.0.0"
    # Where NodePorts listen; empty means every address of the node.
    nodeport_addresses: tuple[str, ...] = ()
    # Ports for proxy sockets; None lets the kernel choose.
    proxy_port_range: tuple[int, int] | None = None
    # Idle UDP flows are forgotten after this long (seconds).
    udp_timeout: float = 30.0
    # Full resync (repairs rules others deleted) at least this often (seconds).
    sync_period: float = 30.0
    # Syncs are batched: at most one per this many seconds.
    min_sync_period: float = 0.05
    # Status server (connection table, API, metrics).
    status_address: tuple[str, int] = ("127.0.0.1", 10249)
    # Health server (/healthz, /livez, /readyz).
    healthz_address: tuple[str, int] = ("0.0.0.0", 10256)
    # Event loop: uvloop or asyncio.
    loop: str = "uvloop"
    # Log format: text or json.
    log_format: str = "text"
    # Verbosity: 0 info, 1+ debug.
    verbosity: int = 0
    # Open connections get this long to finish after SIGTERM (seconds).
    shutdown_grace: float = 5.0
    # Programs iptables; off only for tests that check sockets alone.
    manage_iptables: bool = True


_PARSERS: dict[str, Any] = {
    "manifests": lambda v: tuple(v) if isinstance(v, list | tuple) else (str(v),),
    "kubeconfig": str,
    "master": str,
    "hostname_override": str,
    "bind_address": lambda v: str(ipaddress.ip_address(v)),
    "nodeport_addresses": lambda v: parse_cidrs(",".join(v) if isinstance(v, list) else str(v)),
    "proxy_port_range": lambda v: parse_port_range(str(v)),
    "udp_timeout": parse_duration,
    "sync_period": parse_duration,
    "min_sync_period": parse_duration,
    "status_address": lambda v: parse_hostport(str(v)),
    "healthz_address": lambda v: parse_hostport(str(v)),
    "loop": lambda v: _choice(v, ("uvloop", "asyncio")),
    "log_format": lambda v: _choice(v, ("text", "json")),
    "verbosity": int,
    "shutdown_grace": parse_duration,
    "manage_iptables": lambda v: _boolean(v),
}


def _boolean(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true or false)")


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _convert(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {f.name for f in fields(Settings)}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise SettingsError(f"{where}: unknown setting {raw_key!r}")
        try:
            out[key] = _PARSERS[key](value)
        except (ValueError, TypeError) as exc:
            label = "--" + key.replace("_", "-") if where == "command line" else raw_key
            if where == "environment":
                label = "UPROXY_" + key.upper()
            raise SettingsError(f"{where}: {label}: {exc}") from None
    return out


def from_config_file(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: the config file is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SettingsError(f"{path}: the config file must be a mapping of settings")
    return _convert(data, path)


def from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = "UPROXY_" + f.name.upper()
        if name in env:
            values[f.name] = env[name]
    if "manifests" in values:
        values["manifests"] = [p for p in values["manifests"].split(os.pathsep) if p]
    return _convert(values, "environment")


def load(flags: Mapping[str, Any], *, config_file: str | None = None,
         env: Mapping[str, str] | None = None) -> Settings:
    """Merge the layers; ``flags`` holds only what was given on the command line."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(from_config_file(config_file))
    merged.update(from_environment(os.environ if env is None else env))
    merged.update(_convert(flags, "command line"))
    return replace(Settings(), **merged)
