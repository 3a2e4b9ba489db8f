"""Settings (uproxy.settings): parsers, layer precedence, one-line errors naming the source."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from uproxy.cli import build_parser, settings_from_args
from uproxy.settings import (
    DECLARED,
    KubeSettings,
    Settings,
    SettingsError,
    load,
    parse_cidrs,
    parse_duration,
    parse_hostport,
    parse_port_range,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("3h", 10800.0), ("1.5m", 90.0), ("45", 45.0),
     (" 2s ", 2.0), ("0", 0.0), (7, 7.0), (0.5, 0.5)],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["banana", "", "5d", "-1s", "1.5.2s", "ms", True])
def test_bad_durations(text: str | bool) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_negative_number_duration() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-3)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_duration_is_rejected(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:10249", ("127.0.0.1", 10249)), (":10256", ("0.0.0.0", 10256)),
     ("[::1]:80", ("::1", 80)), ("localhost:8080", ("localhost", 8080))],
)
def test_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "host:http", "host:70000", ""])
def test_bad_hostport(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("40000-49999", (40000, 49999)), ("8080", (8080, 8080)), ("", None), ("0", None),
     ("0-0", None), ("1-65535", (1, 65535))],
)
def test_port_ranges(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["a-b", "100-50", "0-10", "1-65536", "1-2-3", "-5"])
def test_bad_port_ranges(text: str) -> None:
    with pytest.raises(ValueError):
        parse_port_range(text)


def test_cidrs() -> None:
    assert parse_cidrs("10.0.0.0/8, 192.168.1.7/24,,fd00::/64") == (
        "10.0.0.0/8", "192.168.1.0/24", "fd00::/64")
    assert parse_cidrs("") == ()
    with pytest.raises(ValueError):
        parse_cidrs("10.0.0.0/33")


def test_defaults() -> None:
    s = load({}, env={})
    assert s == Settings(hostname_override=s.hostname_override)
    assert s.sync_period == 30.0 and s.proxy_port_range is None and s.manage_iptables


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "uproxy.yaml"
    cfg.write_text("sync-period: 10s\nudp_timeout: 1m\nmin_sync_period: 100ms\n"
                   "proxy_port_range: 30000-30010\nnodeport_addresses: [10.0.0.0/8]\n")
    env = {"UPROXY_SYNC_PERIOD": "20s", "UPROXY_UDP_TIMEOUT": "2m", "UNRELATED": "x"}
    s = load({"sync_period": "30s"}, config_file=str(cfg), env=env)
    assert s.sync_period == 30.0  # flag
    assert s.udp_timeout == 120.0  # environment
    assert s.min_sync_period == pytest.approx(0.1)  # file
    assert s.proxy_port_range == (30000, 30010)  # file
    assert s.nodeport_addresses == ("10.0.0.0/8",)
    assert s.shutdown_grace == 5.0  # default
    assert load({}, config_file=str(cfg), env=env).sync_period == 20.0
    assert load({}, config_file=str(cfg), env={}).sync_period == 10.0


def test_environment_values() -> None:
    env = {"UPROXY_MANIFESTS": "/a.yaml:/b", "UPROXY_MANAGE_IPTABLES": "false",
           "UPROXY_STATUS_ADDRESS": "0.0.0.0:9999", "UPROXY_LOOP": "asyncio",
           "UPROXY_VERBOSITY": "2"}
    s = load({}, env=env)
    assert s.manifests == ("/a.yaml", "/b")
    assert s.manage_iptables is False
    assert s.status_address == ("0.0.0.0", 9999)
    assert (s.loop, s.verbosity) == ("asyncio", 2)
    assert load({"manifests": ["x.yaml"]}, env={}).manifests == ("x.yaml",)


def _one_line(exc: pytest.ExceptionInfo[SettingsError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_flag_error_names_the_flag() -> None:
    with pytest.raises(SettingsError) as exc:
        load({"proxy_port_range": "9-1"}, env={})
    assert _one_line(exc).startswith("command line: --proxy-port-range: ")
    with pytest.raises(SettingsError) as exc:
        load({"sync_period": "banana"}, env={})
    assert _one_line(exc) == ("command line: --sync-period: 'banana' is not a duration "
                              "(like 250ms, 30s, 3h)")


def test_environment_error_names_the_variable() -> None:
    with pytest.raises(SettingsError) as exc:
        load({}, env={"UPROXY_SYNC_PERIOD": "soon"})
    assert _one_line(exc).startswith("environment: UPROXY_SYNC_PERIOD: 'soon'")
    with pytest.raises(SettingsError) as exc:
        load({}, env={"UPROXY_BIND_ADDRESS": "1.2.3.4.5"})
    assert _one_line(exc).startswith("environment: UPROXY_BIND_ADDRESS: ")


@pytest.mark.parametrize("value", ["ture", "maybe", "2"])
def test_bad_boolean_is_an_error_not_false(value: str) -> None:
    with pytest.raises(SettingsError) as exc:
        load({}, env={"UPROXY_MANAGE_IPTABLES": value})
    assert _one_line(exc).startswith("environment: UPROXY_MANAGE_IPTABLES: ")


@pytest.mark.parametrize(("value", "expected"),
                         [("1", True), ("yes", True), ("On", True), ("0", False), ("no", False),
                          ("off", False), ("FALSE", False)])
def test_booleans(value: str, expected: bool) -> None:
    assert load({}, env={"UPROXY_MANAGE_IPTABLES": value}).manage_iptables is expected


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "uproxy.yaml"
    cfg.write_text("healthz-address: nowhere\n")
    with pytest.raises(SettingsError) as exc:
        load({}, config_file=str(cfg), env={})
    assert _one_line(exc).startswith(f"{cfg}: healthz-address: ")
    cfg.write_text("no_such_setting: 1\n")
    with pytest.raises(SettingsError) as exc:
        load({}, config_file=str(cfg), env={})
    assert _one_line(exc) == f"{cfg}: unknown setting 'no_such_setting'"
    cfg.write_text("sync_period: [unclosed\n")
    with pytest.raises(SettingsError) as exc:
        load({}, config_file=str(cfg), env={})
    assert _one_line(exc).startswith(f"{cfg}: not valid YAML")
    cfg.write_text("- a list\n")
    with pytest.raises(SettingsError) as exc:
        load({}, config_file=str(cfg), env={})
    assert _one_line(exc).startswith(f"{cfg}: ")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SettingsError) as exc:
        load({}, config_file=str(missing), env={})
    assert _one_line(exc).startswith(f"{missing}: cannot read config file")


def test_empty_config_file_means_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    assert load({}, config_file=str(cfg), env={}).sync_period == 30.0


def test_choices() -> None:
    with pytest.raises(SettingsError) as exc:
        load({}, env={"UPROXY_LOG_FORMAT": "xml"})
    assert "UPROXY_LOG_FORMAT" in _one_line(exc) and "text, json" in _one_line(exc)


def test_non_string_key_and_non_utf8_file(tmp_path: Path) -> None:
    cfg = tmp_path / "uproxy.yaml"
    cfg.write_text("80: x\n")
    with pytest.raises(SettingsError) as exc:
        load({}, config_file=str(cfg), env={})
    assert _one_line(exc) == f"{cfg}: unknown setting 80"
    cfg.write_bytes(b"\xff\xfe\x00sync_period: 1s\n")
    with pytest.raises(SettingsError) as exc:
        load({}, config_file=str(cfg), env={})
    assert _one_line(exc).startswith(f"{cfg}: ")


# --- the one declaration: readers, --help and the README come from it ----------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_declared_with_help_and_a_default_that_parses() -> None:
    assert {d.attr for d in DECLARED if d.group is None} | {"kube"} == {
        f.name for f in fields(Settings)}
    assert {d.attr for d in DECLARED if d.group == "kube"} == {f.name for f in fields(KubeSettings)}
    for d in DECLARED:
        assert d.spec.help and "\n" not in d.help_line(), d.name
        if d.default is not None and d.spec.default_text is None:  # shown as the user writes it
            assert d.spec.parse(d.spec.show(d.default)) == d.default, d.name
    flags = [d.flag for d in DECLARED if d.flag]
    assert len({d.env for d in DECLARED}) == len(DECLARED) and len(set(flags)) == len(flags)


def test_run_help_has_one_line_per_flag_and_lists_the_rest() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    text = run.format_help()
    lines = text.splitlines()
    for d in DECLARED:
        if d.flag:
            [line] = [ln for ln in lines if ln.lstrip().startswith(d.flag + " ")]
            assert line.endswith(d.help_line()), line  # whole, on the flag's own line
        else:
            [line] = [ln for ln in lines if ln.lstrip().startswith(d.env + " ")]
            assert line.endswith(d.help_line()), line
    assert max(len(ln) for ln in lines if not ln.startswith("usage")) <= 100


def test_the_flags_make_the_settings() -> None:
    args = build_parser().parse_args(
        ["run", "--manifests", "a", "--manifests", "b", "--sync-period", "1s", "-v", "2",
         "--loop", "asyncio", "--status-address", ":1"])
    s = settings_from_args(args, env={})
    assert s.manifests == ("a", "b") and s.sync_period == 1.0 and s.verbosity == 2
    assert (s.loop, s.status_address) == ("asyncio", ("0.0.0.0", 1))


def test_the_readme_flag_list_matches_the_declaration() -> None:
    text = README.read_text()
    start = text.index("`uproxy run` flags")
    paragraph = text[start:text.index("\n\n", start)]
    flag_list, _, prose = paragraph.partition("Settings come from")
    quoted = re.findall(r"`([^`]+)`", flag_list)
    flags = {q.split()[0]: q for q in quoted if q.startswith("-")}
    declared = {d.flag: d for d in DECLARED if d.flag}
    assert set(flags) == set(declared) | {"--config"}
    for flag, shown in flags.items():
        if flag == "--config":
            continue
        d = declared[flag]
        meta = "|".join(d.spec.choices) if d.spec.choices else d.spec.metavar
        assert shown == f"{flag} {meta}", shown
    for flag, default in re.findall(r"`(--[a-z-]+)[^`]*` \(default\s+([^)]+)\)", flag_list):
        assert default == declared[flag].spec.show(declared[flag].default), flag
    variables = set(re.findall(r"`(UPROXY_[A-Z_]+)`", prose))
    without_flag = {d.env for d in DECLARED if not d.flag and d.group is None}
    assert without_flag <= variables <= {d.env for d in DECLARED}
    assert "`UPROXY_KUBE_*`" in prose


def test_the_kubernetes_group() -> None:
    env = {"UPROXY_KUBE_PAGE_SIZE": "3", "UPROXY_KUBE_BACKOFF_INITIAL": "50ms"}
    s = load({}, env=env)
    assert s.kube == KubeSettings(page_size=3, backoff_initial=0.05)
    assert load({}, env={}).kube == KubeSettings()
    with pytest.raises(SettingsError) as exc:
        load({}, env={"UPROXY_KUBE_PAGE_SIZE": "0"})
    assert _one_line(exc).startswith("environment: UPROXY_KUBE_PAGE_SIZE: ")
    with pytest.raises(SettingsError) as exc:
        load({}, env={"UPROXY_KUBE_BACKOFF_MAX": "0s"})
    assert "positive" in _one_line(exc)


def test_kube_settings_from_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "uproxy.yaml"
    cfg.write_text("kube_watch_timeout_seconds: 60\nkube-inactivity-timeout: 2m\n")
    kube = load({}, config_file=str(cfg), env={}).kube
    assert (kube.watch_timeout_seconds, kube.inactivity_timeout) == (60, 120.0)


def test_udp_max_flows() -> None:
    assert load({}, env={}).udp_max_flows is None  # the udp side computes it from the fd limit
    assert load({}, env={"UPROXY_UDP_MAX_FLOWS": "32"}).udp_max_flows == 32
    for bad in ("zero", "-3", "0"):
        with pytest.raises(SettingsError) as exc:
            load({}, env={"UPROXY_UDP_MAX_FLOWS": bad})
        assert _one_line(exc).startswith("environment: UPROXY_UDP_MAX_FLOWS: ")


@pytest.mark.parametrize(("value", "expected"),
                         [("1", True), ("yes", True), ("false", True), ("0", False), ("", False)])
def test_no_native_keeps_its_rule(value: str, expected: bool) -> None:
    # As native.py read it: anything but empty or "0" chooses the Python twin.
    assert load({}, env={"UPROXY_NO_NATIVE": value}).no_native is expected
    assert load({}, env={}).no_native is False


def test_nothing_below_cli_reads_the_environment() -> None:
    package = Path(__file__).resolve().parents[2] / "uproxy"
    readers = [str(p.relative_to(package)) for p in package.rglob("*.py")
               if re.search(r"os\.environ|os\.getenv", p.read_text())]
    # cli reads it once; the demo (wiring, beside cli) starts lab processes with it.
    assert set(readers) <= {"cli.py", "demo/lab.py"}


def test_masquerade_all_is_kube_proxys_bool_flag_given_alone_or_with_a_value() -> None:
    def parsed(*argv: str, env: dict[str, str] | None = None) -> bool:
        args = build_parser().parse_args(["run", *argv])
        return settings_from_args(args, env=env or {}).masquerade_all

    assert parsed() is False
    assert parsed("--masquerade-all") is True
    assert parsed("--masquerade-all=true") is True
    assert parsed("--masquerade-all", "false") is False
    assert parsed(env={"UPROXY_MASQUERADE_ALL": "yes"}) is True
