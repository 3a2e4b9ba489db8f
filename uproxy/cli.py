"""Entry points: ``uproxy run | cleanup | rules | get | demo``.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration at
start. Every start-up problem a user can cause is one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from uproxy import __version__, native
from uproxy.settings import (
    HELP_COLUMN,
    HELP_WIDTH,
    Settings,
    SettingsError,
    add_arguments,
    epilog,
    load,
)

log = logging.getLogger("uproxy")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or configuration at start: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2, as argparse does, but terse
        self.exit(EXIT_USAGE, f"uproxy: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uproxy", description="A userspace Kubernetes service proxy.")
    parser.add_argument("--version", action="version", version=f"uproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="proxy services on this node",
                         description="Proxy services on this node.", epilog=epilog(),
                         formatter_class=_HelpFormatter)
    add_arguments(run)
    run.add_argument("--config", metavar="FILE", help="YAML file of settings (keys as below)")

    sub.add_parser("cleanup", help="remove every chain, rule and nftables table uproxy ever "
                   "made, then exit")

    rules = sub.add_parser("rules", help="print the nft / iptables-restore text it would apply")
    rules.add_argument("--manifests", metavar="PATH", action="append", required=True,
                       help="file or directory of YAML/JSON manifests (repeatable)")
    rules.add_argument("--proxy-port-range", metavar="LOW-HIGH", default="40000-49999",
                       help="ports to number the proxy sockets from (default 40000-49999)")
    rules.add_argument("--hostname-override", metavar="NAME", default=None,
                       help="this node's name, for Local traffic policies (default the hostname)")
    rules.add_argument("--interception", choices=("auto", "nftables", "iptables"),
                       default="auto", help="whose rules to print (default auto: nftables "
                       "where nft is installed)")

    get = sub.add_parser("get", help="kubectl-style tables from a running uproxy")
    get.add_argument("what", choices=("services", "svc", "endpoints", "ep", "connections",
                                      "conn"))
    get.add_argument("--status", metavar="URL", default="http://127.0.0.1:10249",
                     help="the status server (default http://127.0.0.1:10249)")
    get.add_argument("-o", dest="output", choices=("wide", "json"), default=None,
                     help="more columns, or JSON")

    demo = sub.add_parser("demo", help="the network-namespace walkthrough")
    demo.add_argument("--once", action="store_true", help="exit after the walkthrough")
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` at a fixed width, so each flag's help is one line whatever the terminal."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=HELP_COLUMN, width=HELP_WIDTH)


def setup_logging(fmt: str, verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s",
                                               "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def run_loop(kind: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def settings_from_args(args: argparse.Namespace,
                       env: Mapping[str, str] | None = None) -> Settings:
    """The flags given, over the environment (this process's if ``env`` is None), over the
    config file."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return load(flags, config_file=getattr(args, "config", None),
                env=os.environ if env is None else env)


def kubeconfig_path(settings: Settings, env: Mapping[str, str]) -> str | None:
    """``--kubeconfig`` (or ``UPROXY_KUBECONFIG``, or the config file), else ``$KUBECONFIG``."""
    return settings.kubeconfig or env.get("KUBECONFIG") or None


def congestion_unavailable(name: str) -> str | None:
    """Why a TCP socket here cannot use congestion control ``name`` (None: it can)."""
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as exc:
            try:
                with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
                    allowed = f.read().split()
            except OSError:
                allowed = []
            return (f"{exc.strerror or exc}" + (f" (allowed here: {', '.join(allowed)})"
                                                 if allowed else ""))
    return None


def preflight(settings: Settings) -> None:
    """Everything that would make ``run`` fail at once, as one line each (exit 2)."""
    if settings.manage_iptables:
        if os.geteuid() != 0:
            raise UsageError("uproxy run needs root (CAP_NET_ADMIN) to program iptables; "
                             "run it as root")
        from uproxy.iptables import Iptables

        missing = Iptables().missing_tool()
        if missing:
            raise UsageError(f"{missing} not found: install iptables (apt-get install iptables)")
        if settings.interception == "nftables":
            from uproxy.nftables import Nftables

            why = asyncio.run(Nftables().available())
            if why is not None:
                raise UsageError(f"--interception nftables: {why}")
    if settings.relay_congestion_control:
        why = congestion_unavailable(settings.relay_congestion_control)
        if why:
            raise UsageError(f"--relay-congestion-control {settings.relay_congestion_control}: "
                             f"{why}")
    if settings.manifests and (settings.kubeconfig or settings.master):
        raise UsageError("--manifests and --kubeconfig/--master are two sources; choose one")
    if settings.manifests:
        from uproxy.sources.files import ManifestError, check_paths

        try:
            check_paths(settings.manifests)
        except ManifestError as exc:
            raise UsageError(str(exc)) from None


def make_source(settings: Settings, env: Mapping[str, str]) -> Any:
    if settings.manifests:
        from uproxy.sources.files import FilesSource

        return FilesSource(settings.manifests)
    try:
        from uproxy.sources.kube import KubeSource
    except ImportError:
        raise UsageError(
            "the Kubernetes API source is not built yet; use --manifests PATH") from None
    return KubeSource(kubeconfig=kubeconfig_path(settings, env), master=settings.master,
                      node_name=settings.hostname_override, settings=settings.kube)


async def _check_kube(settings: Settings, env: Mapping[str, str]) -> None:
    if settings.manifests:
        return
    try:
        from uproxy.sources.kube import ConfigError, check_config
    except ImportError:
        return
    try:
        await check_config(kubeconfig_path(settings, env), settings.master)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    env = dict(os.environ)  # read once, here; everything below is handed what it needs
    settings = settings_from_args(args, env)
    native.select(no_native=settings.no_native)
    setup_logging(settings.log_format, settings.verbosity)
    preflight(settings)
    _raise_fd_limit()

    async def main() -> int:
        from uproxy.daemon import Daemon
        from uproxy.proxy.handover import HandoverServer, Received, TakeoverExit, connect

        await _check_kube(settings, env)
        try:  # a uproxy running with this state dir will hand us every socket it has
            session = connect(settings.state_dir)
        except TakeoverExit as exc:
            print(exc.line, file=sys.stderr)
            return exc.code
        daemon = Daemon(settings, make_source(settings, env), session)
        handover = HandoverServer(asyncio.get_running_loop(), settings.state_dir, daemon)
        status: list[Any] = []

        async def serve(adopted: Received | None) -> None:
            """The status/health servers (on the sockets that came over, if any) and the
            takeover socket for the next upgrade."""
            try:
                status[:] = await _start_status(daemon, _adopted_servers(settings, adopted))
            except UsageError as exc:
                if adopted is None:
                    raise
                log.error("%s; serving without them", exc)  # we own every socket now
            daemon.server_sockets = _server_sockets(status)
            try:
                handover.start()
            except OSError as exc:
                log.warning("no takeover socket in %s (%s): an upgrade will start from scratch",
                            settings.state_dir, exc.strerror or exc)

        if session is None:
            await serve(None)
        else:  # once the source is loaded and the sockets came over
            daemon.after_takeover = serve
        try:
            await daemon.run()
        finally:
            handover.close()
            await _close_status(status, linger=daemon.handed_over)
        if daemon.takeover_error is not None:
            print(daemon.takeover_error.line, file=sys.stderr)
            return daemon.takeover_error.code
        if daemon.handed_over and settings.after_handover == "wait":
            if daemon.exit_watchdog is not None:  # staying on is the point here
                daemon.exit_watchdog.cancel()
            await _idle_until_terminated()
        return EXIT_OK

    return run_loop(settings.loop, main)


async def _idle_until_terminated() -> None:
    """Hold nothing and wait for SIGTERM/SIGINT: a DaemonSet's old pod, which would be
    restarted (and take everything back) if it exited before the controller deletes it."""
    import signal

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    log.info("handed over; waiting for SIGTERM (UPROXY_AFTER_HANDOVER=wait)")
    await done.wait()


def _adopted_servers(settings: Settings, adopted: Any) -> dict[str, Any]:
    """The status/health sockets that came over, if they listen where we are told to."""
    out: dict[str, Any] = {}
    if adopted is None:
        return out
    wanted = {"status": settings.status_address, "health": settings.healthz_address}
    for item, (sock, *_) in adopted.of_kind("server"):
        which = item.meta.get("which")
        if which in wanted and sock.getsockname()[:2] == wanted[which]:
            out[which] = sock
        else:
            sock.close()
    return out


async def _close_status(runners: list[Any], *, linger: bool) -> None:
    """Close the status/health servers. After a handover (``linger``) the new uproxy listens
    on the same sockets: stop accepting first, then answer the probes this process had
    already accepted (up to the health-check node ports' linger) before closing them."""
    if linger and runners:
        from uproxy.daemon import HEALTH_CHECK_LINGER
        from uproxy.status.server import stop_accepting
        from uproxy.status.service_health import let_accepted_finish

        for runner in runners:
            stop_accepting(runner)
        await let_accepted_finish(runners, HEALTH_CHECK_LINGER)
    for runner in runners:
        await runner.cleanup()


def _server_sockets(runners: list[Any]) -> dict[str, Any]:
    """Copies of the status/health listening sockets, to hand to the next uproxy."""
    if not runners:
        return {}
    from uproxy.status.server import listening_socket

    return dict(zip(("status", "health"), map(listening_socket, runners), strict=False))


async def _start_status(daemon: Any, sockets: Mapping[str, Any] | None = None) -> list[Any]:
    try:
        from uproxy.status.server import start_servers
    except ImportError:
        return []
    try:
        runners: list[Any] = await start_servers(daemon, sockets)
    except OSError as exc:
        raise UsageError(f"cannot start the status/health servers: {exc.strerror or exc}") from None
    return runners


FD_LIMIT_WANT = 1 << 20
"""Open files uproxy asks for: two per relayed connection, one per listener and UDP flow.
As root the hard limit is raised too (towards ``fs.nr_open``), as HAProxy does for its
``maxconn``; without the privilege the soft limit goes up to the hard one."""


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT_WANT
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = min(want, int(f.read()))
    except (OSError, ValueError):
        pass
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # needs CAP_SYS_RESOURCE; a container without it keeps its hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (OSError, ValueError):
            pass
        else:
            log.debug("raised the open-files limit from %d/%d to %d", soft, hard, want)
            return
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("raised the open-files limit from %d to %d", soft, hard)


def cmd_cleanup(_: argparse.Namespace) -> int:
    setup_logging("text", 0)
    if os.geteuid() != 0:
        raise UsageError("uproxy cleanup needs root to change iptables; run it as root")
    if shutil.which("iptables-save") is None:
        raise UsageError("iptables-save not found: install iptables (apt-get install iptables)")
    from uproxy.iptables import Iptables
    from uproxy.proxy.transparent import Transparent

    async def cleanup() -> int:  # IPv6 only where ip6tables works
        removed = await Iptables().cleanup()
        v6 = Iptables(family=6)
        if await v6.unusable() is None:
            removed += await v6.cleanup()
        if shutil.which("nft") is not None:
            from uproxy.nftables import Nftables

            removed += await Nftables().cleanup()
        return removed + await Transparent().cleanup(sweep=True)

    removed = asyncio.run(cleanup())
    print(f"removed {removed} uproxy rules, chains and tables")
    return EXIT_OK


def cmd_rules(args: argparse.Namespace) -> int:
    from uproxy.redirects import placeholder_redirects, proxy_ports_needed
    from uproxy.rules import render
    from uproxy.settings import parse_port_range
    from uproxy.sources.files import FilesSource, ManifestError, check_paths
    from uproxy.state import Store

    setup_logging("text", 0)
    paths = tuple(args.manifests)
    try:
        check_paths(paths)
        port_range = parse_port_range(args.proxy_port_range) or (40000, 49999)
    except (ManifestError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    store = Store()
    FilesSource(paths).load(store)
    table = store.table()
    needed = proxy_ports_needed(table)
    available = port_range[1] - port_range[0] + 1
    if needed > available:
        raise UsageError(f"--proxy-port-range {args.proxy_port_range} holds {available} ports "
                         f"but the manifests need {needed}")
    redirects = placeholder_redirects(table, range(port_range[0], port_range[1] + 1))
    out = ["# uproxy rules for " + ", ".join(paths),
           "# proxy ports are numbered from the start of --proxy-port-range; "
           "a running uproxy uses the first free ones"]
    if args.interception == "nftables" or (args.interception == "auto"
                                           and shutil.which("nft") is not None):
        text = "\n".join(out) + "\n" + _nft_rules(redirects.rules)
    else:
        text = ("\n".join(out) + "\n# iptables-restore --noflush (IPv4)\n"
                + render(redirects.rules))
        if any(r.family == 6 for r in redirects.rules):
            text += "# ip6tables-restore --noflush (IPv6)\n" + render(redirects.rules, family=6)
    sys.stdout.write(text + _transparent_rules())
    _print_filter_rules(store, table, args.hostname_override)
    return EXIT_OK


def _nft_rules(redirects: Sequence[Any]) -> str:
    """The nftables interception's part of ``uproxy rules``: one ``nft -f`` text per family."""
    from uproxy import nftrules

    text = ("# nft -f (IPv4): uproxy's own table; the first packet of each new connection\n"
            "# looks its address . protocol . port up in the map and is redirected to\n"
            "# the proxy port (--interception iptables prints the iptables chain instead)\n"
            + nftrules.render(redirects, family=4))
    if any(r.family == 6 for r in redirects):
        text += "# nft -f (IPv6)\n" + nftrules.render(redirects, family=6)
    return text


def _transparent_rules() -> str:
    """Transparent mode's part of ``uproxy rules``: the same for every manifest."""
    from uproxy import transparent

    lines = ["# transparent mode (off with --masquerade-all): iptables and ip6tables mangle,",
             "# and policy routing for both families:"]
    lines += [f"#   ip -{f} rule add {' '.join(transparent.rule_spec())}; "
              f"ip -{f} route replace {' '.join(transparent.route_spec(f))}" for f in (4, 6)]
    return "\n".join(lines) + "\n" + transparent.render_mangle(hooks=True)


def _print_filter_rules(store: Any, table: Any, node_name: str | None) -> None:
    """The filter table's part of ``uproxy rules`` (:mod:`uproxy.filter_rules`), when any."""
    import socket

    from uproxy.filter_rules import filter_rules_of, render_filter

    node = node_name or socket.gethostname()
    lines = [line for name in sorted(table)
             for line in filter_rules_of(table[name], node_name=node,
                                         node_ips=store.node_ips(node))]
    if lines:
        sys.stdout.write(render_filter(lines))


def cmd_get(args: argparse.Namespace) -> int:
    try:
        from uproxy.status.client import get
    except ImportError:
        raise UsageError(
            "uproxy get needs the status server, which is not built yet") from None
    result: int = get(args.what, status=args.status, output=args.output)
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    from uproxy.demo.walkthrough import main as demo_main

    result: int = demo_main(once=args.once)
    return result


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "cleanup": cmd_cleanup, "rules": cmd_rules, "get": cmd_get, "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, SettingsError) as exc:
        print(f"uproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:  # e.g. the status port is taken
        print(f"uproxy: {exc.strerror or exc}"
              + (f": {exc.filename}" if getattr(exc, "filename", None) else ""), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
