"""Every setting, declared once: flags > environment (``UPROXY_*``) > config file > defaults.

Each field of :class:`Settings` (and of its Kubernetes group, :class:`KubeSettings`)
is declared with :func:`setting`: its type and default, how a text value is
parsed, and a one-line help. Everything else is derived from that one line:
the flag (``--sync-period``; ``flag=None`` for settings set only by environment
or config file), the environment variable (``UPROXY_SYNC_PERIOD``), the
config-file key (``sync_period``, dashes accepted), the ``uproxy run`` argument
parser (:func:`add_arguments`) and its ``--help`` (:func:`epilog` lists the
settings without a flag). :func:`load` merges the layers and raises
:class:`SettingsError` with one line naming the bad value and where it came
from. Settings are passed explicitly, never read from a global; the caller
hands :func:`load` the environment: nothing here reads the process environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml


class SettingsError(Exception):
    """A bad flag, environment variable or config value: one line for the user."""


# --- parsers: text (or a YAML value) -> the setting's type; ValueError on bad input -------

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


def format_duration(seconds: float) -> str:
    """The shortest of ``50ms``, ``30s``: how a default duration is shown in ``--help``."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


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


def _boolean(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true or false)")


def _set_unless_zero(value: Any) -> bool:
    """``UPROXY_NO_NATIVE``'s old rule: anything but empty or ``0`` means yes."""
    if isinstance(value, bool):
        return value
    return str(value).strip() not in ("", "0")


def _choice(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return str(value)

    return parse


def _congestion_name(value: Any) -> str:
    """A TCP congestion control's name (``TCP_CONGESTION``: at most 15 characters), or ""."""
    text = str(value).strip()
    if len(text) > 15 or not all(c.isalnum() or c in "_-" for c in text):
        raise ValueError(f"{value!r} is not a congestion control name (cubic, reno, bbr, ...)")
    return text


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    try:
        return int(value)
    except (ValueError, TypeError):
        raise ValueError(f"{value!r} is not an integer") from None


ENGINE_THREADS_MAX = 64
"""As ``UPROXY_ENGINE_THREADS_MAX`` in native/uproxy_native.h."""


def _engine_threads(value: Any) -> int:
    """``auto`` (0: one per usable core, see :func:`uproxy.proxy.relay.engine_threads`) or
    1 to 64."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        number = _integer(value)
    except ValueError:
        number = 0
    if not 1 <= number <= ENGINE_THREADS_MAX:
        raise ValueError(f"{value!r} is not auto or 1 to {ENGINE_THREADS_MAX}")
    return number


def _show_threads(value: Any) -> str:
    return "auto" if value == 0 else str(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a positive integer")
    try:
        number = int(value)
    except (ValueError, TypeError):
        number = 0
    if number < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return number


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


def _paths(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list | tuple) else (str(value),)


def _cidr_list(value: Any) -> tuple[str, ...]:
    return parse_cidrs(",".join(value) if isinstance(value, list) else str(value))


def _nodeport_addresses(value: Any) -> tuple[str, ...]:
    if str(value).strip() == "primary":
        return ("primary",)
    return _cidr_list(value)


def _ip(value: Any) -> str:
    return str(ipaddress.ip_address(value))


def _hostport(value: Any) -> tuple[str, int]:
    return parse_hostport(str(value))


def _port_range(value: Any) -> tuple[int, int] | None:
    return parse_port_range(str(value))


def _show_hostport(value: tuple[str, int]) -> str:
    return f"{value[0]}:{value[1]}"


def _show_bool(value: bool) -> str:
    return "true" if value else "false"


# --- the declaration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """How one setting is read and explained (the ``metadata`` of its dataclass field)."""

    parse: Callable[[Any], Any]
    """Text (or a YAML value) -> the value; raises ValueError with a one-line reason."""
    help: str
    """One line for ``--help``; the default is appended unless ``default_text`` is ``""``."""
    metavar: str | None = None
    flag: str | None = ""
    """``""``: ``--`` plus the name with dashes; ``None``: environment and config file only."""
    choices: tuple[str, ...] | None = None
    repeat: bool = False
    """Repeatable flag, ``os.pathsep``-separated variable, list in the config file."""
    show: Callable[[Any], str] = str
    """The default as the user would write it."""
    bare: str | None = None
    """The flag may be given without a value, meaning this one (kube-proxy's bool flags)."""
    default_text: str | None = None
    """Says what the default means where the value itself would not (e.g. ``None``)."""


def setting(default: Any = MISSING, *, parse: Callable[[Any], Any], help: str,
            default_factory: Callable[[], Any] | None = None, **how: Any) -> Any:
    """A dataclass field declaring one setting (see :class:`Setting` for ``how``)."""
    meta = {"setting": Setting(parse=parse, help=help, **how)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


_DUR: dict[str, Any] = {"parse": parse_duration, "metavar": "DURATION", "show": format_duration}
_POSITIVE_DUR: dict[str, Any] = {**_DUR, "parse": _positive_duration}


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """Tuning of the API source's list+watch loops (the defaults suit a real cluster).

    Set only by environment (``UPROXY_KUBE_PAGE_SIZE``) or config file (``kube_page_size``).
    """

    page_size: int = setting(
        500, parse=_positive_int, metavar="N", flag=None,
        help="objects per list page")
    watch_timeout_seconds: int = setting(
        300, parse=_positive_int, metavar="SECONDS", flag=None,
        help="timeoutSeconds of each watch request")
    inactivity_timeout: float = setting(
        90.0, **_POSITIVE_DUR, flag=None,
        help="a silent watch is reconnected after this long")
    backoff_initial: float = setting(
        0.2, **_POSITIVE_DUR, flag=None,
        help="first retry delay; doubles per failure, jittered")
    backoff_max: float = setting(
        30.0, **_POSITIVE_DUR, flag=None,
        help="cap of the retry delay")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``uproxy run`` can be told, in the order ``--help`` shows it."""

    manifests: tuple[str, ...] = setting(
        (), parse=_paths, metavar="PATH", repeat=True, default_text="",
        help="YAML/JSON manifest file or directory (repeatable); else the API")
    kubeconfig: str | None = setting(
        None, parse=str, metavar="PATH", default_text="",
        help="kubeconfig of the API source (else $KUBECONFIG, else in-cluster)")
    master: str | None = setting(
        None, parse=str, metavar="URL", default_text="",
        help="API server URL, overriding the kubeconfig's")
    hostname_override: str = setting(
        parse=str, default_factory=socket.gethostname, metavar="NAME",
        default_text="the hostname", help="this node's name, as in its Node object")
    service_proxy_name: str | None = setting(
        None, parse=str, metavar="NAME", default_text="",
        help="serve only Services whose service-proxy-name label is NAME")
    node_zone: str | None = setting(
        None, parse=str, metavar="ZONE", default_text="its Node's label",
        help="this node's zone, for topology hints")
    bind_address: str = setting(
        "0.0.0.0", parse=_ip, metavar="IP",
        help="address the proxy sockets bind to")
    nodeport_addresses: tuple[str, ...] = setting(
        (), parse=_nodeport_addresses, metavar="CIDR[,CIDR]",
        default_text="all", help="where NodePorts listen (or primary)")
    proxy_port_range: tuple[int, int] | None = setting(
        None, parse=_port_range, metavar="LOW-HIGH", default_text="the kernel's choice",
        help="ports for the proxy sockets")
    udp_timeout: float = setting(
        30.0, **_DUR, help="idle UDP flows are forgotten after this long")
    sync_period: float = setting(
        30.0, **_DUR, help="full resync (repairs deleted rules) this often")
    min_sync_period: float = setting(
        0.05, **_DUR, help="syncs are batched: at most one per this long")
    status_address: tuple[str, int] = setting(
        ("127.0.0.1", 10249), parse=_hostport, metavar="HOST:PORT", show=_show_hostport,
        help="status page, API and metrics")
    healthz_address: tuple[str, int] = setting(
        ("0.0.0.0", 10256), parse=_hostport, metavar="HOST:PORT", show=_show_hostport,
        help="/healthz, /livez and /readyz")
    masquerade_all: bool = setting(
        False, parse=_boolean, show=_show_bool, metavar="BOOL", bare="true",
        help="backends always see the node's address")
    relay_congestion_control: str = setting(
        "", parse=_congestion_name, metavar="NAME",
        help="relayed connections' TCP congestion control (cubic, ...)")
    engine_threads: int = setting(
        0, parse=_engine_threads, show=_show_threads, metavar="N|auto",
        help="engine threads (auto: one per core, at most 8)")
    state_dir: str = setting(
        "/run/uproxy", parse=str, metavar="DIR",
        help="takeover socket for upgrades")
    after_handover: str = setting(
        "exit", parse=_choice(("exit", "wait")), choices=("exit", "wait"), flag=None,
        help="after a takeover: exit 0, or idle until SIGTERM")
    interception: str = setting(
        "auto", parse=_choice(("auto", "nftables", "iptables")),
        metavar="MODE", help="auto, nftables (O(1) map) or iptables (chain)")
    loop: str = setting(
        "uvloop", parse=_choice(("uvloop", "asyncio")), choices=("uvloop", "asyncio"),
        help="event loop")
    log_format: str = setting(
        "text", parse=_choice(("text", "json")), choices=("text", "json"),
        help="log line format")
    verbosity: int = setting(
        0, parse=_integer, flag="-v", metavar="N", help="log verbosity: 0 info, 1 or more debug")
    shutdown_grace: float = setting(
        5.0, **_DUR, flag=None, help="open connections' time to finish after SIGTERM")
    manage_iptables: bool = setting(
        True, parse=_boolean, show=_show_bool, flag=None, metavar="BOOL",
        help="program iptables (false: socket-only tests)")
    udp_max_flows: int | None = setting(
        None, parse=_positive_int, flag=None, metavar="N",
        default_text="half the fd limit, at most 65536",
        help="UDP flow table size")
    no_native: bool = setting(
        False, parse=_set_unless_zero, flag=None, metavar="1", default_text="",
        help="1: use the pure-Python relay twin, not the compiled engine")
    kube: KubeSettings = field(default_factory=KubeSettings,
                               metadata={"group": ("kube", KubeSettings)})
    """The API source's list+watch tuning (names ``kube_*``)."""


@dataclass(frozen=True, slots=True)
class Declared:
    """One setting with its derived names: flag, variable, config key."""

    name: str  # e.g. "kube_page_size": the config-file key and the flag's dest
    group: str | None  # "kube" for KubeSettings fields
    attr: str  # the field's name within its dataclass
    spec: Setting
    default: Any

    @property
    def flag(self) -> str | None:
        if self.spec.flag is None:
            return None
        return self.spec.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "UPROXY_" + self.name.upper()

    def help_line(self) -> str:
        shown = self.spec.default_text
        if shown is None:
            shown = self.spec.show(self.default)
        return f"{self.spec.help} (default {shown})" if shown else self.spec.help


def _declared(cls: type, group: str | None = None) -> Iterator[Declared]:
    for f in fields(cls):
        if "group" in f.metadata:
            name, members = f.metadata["group"]
            yield from _declared(members, name)
            continue
        # A computed default (the hostname) is described by its default_text, not evaluated.
        default = None if f.default is MISSING else f.default
        yield Declared(name=f"{group}_{f.name}" if group else f.name, group=group, attr=f.name,
                       spec=f.metadata["setting"], default=default)


#: Every setting, in declaration order.
DECLARED: tuple[Declared, ...] = tuple(_declared(Settings))
_BY_NAME = {d.name: d for d in DECLARED}


# --- readers generated from the declaration -------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``uproxy run`` flag per setting that has one; absent flags stay out of the result."""
    for d in DECLARED:
        if d.flag is None:
            continue
        kwargs: dict[str, Any] = {"dest": d.name, "default": argparse.SUPPRESS,
                                  "help": d.help_line()}
        if d.spec.choices:
            kwargs["choices"] = d.spec.choices
        else:
            kwargs["metavar"] = d.spec.metavar
        if d.spec.repeat:
            kwargs["action"] = "append"
        if d.spec.bare is not None:
            kwargs.update(nargs="?", const=d.spec.bare)
        parser.add_argument(d.flag, **kwargs)


#: ``--help``'s layout: flags (and variables) in a column this wide, then one line of help.
HELP_COLUMN, HELP_WIDTH = 36, 100


def epilog() -> str:
    """``--help``'s list of the settings set only by environment or config file."""
    return "\n".join([
        "Each flag is also a variable and a config-file (--config) key: --sync-period is",
        "UPROXY_SYNC_PERIOD and sync_period (-v N is UPROXY_VERBOSITY and verbosity). Flags win",
        "over the environment, which wins over the config file.",
        "",
        "Set by environment or config file only (the key is the name without UPROXY_, in lower",
        "case):",
        *(f"  {d.env:<{HELP_COLUMN - 4}}  {d.help_line()}" for d in DECLARED if d.flag is None),
    ])


def _convert(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        d = _BY_NAME.get(key)
        if d is None:
            raise SettingsError(f"{where}: unknown setting {raw_key!r}")
        try:
            out[key] = d.spec.parse(value)
        except (ValueError, TypeError) as exc:
            label = raw_key
            if where == "command line":
                label = d.flag or "--" + key.replace("_", "-")
            elif where == "environment":
                label = d.env
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
    for d in DECLARED:
        if d.env in env:
            text = env[d.env]
            values[d.name] = [p for p in text.split(os.pathsep) if p] if d.spec.repeat else text
    return _convert(values, "environment")


def load(flags: Mapping[str, Any], *, config_file: str | None = None,
         env: Mapping[str, str]) -> Settings:
    """Merge the layers; ``flags`` holds only what was given on the command line."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(from_config_file(config_file))
    merged.update(from_environment(env))
    merged.update(_convert(flags, "command line"))
    top = {_BY_NAME[k].attr: v for k, v in merged.items() if _BY_NAME[k].group is None}
    kube = {_BY_NAME[k].attr: v for k, v in merged.items() if _BY_NAME[k].group == "kube"}
    return replace(Settings(), **top, kube=replace(KubeSettings(), **kube))
