"""Configuring the API client: a kubeconfig file, else in-cluster, with ``--master`` on top.

Every way this can fail becomes one :class:`ConfigError` line, so ``uproxy run``
can check the configuration before it starts and exit 2 with that line. The
caller resolves which kubeconfig (``--kubeconfig``, else ``$KUBECONFIG``): this
module reads no environment variable of its own.
"""

from __future__ import annotations

import os
from typing import Any

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config


class ConfigError(Exception):
    """The API client cannot be configured (one line, fit to print as is)."""


async def load_configuration(kubeconfig: str | None, master: str | None) -> Any:
    """A kubernetes_asyncio ``Configuration``: the kubeconfig (the first of a
    ``$KUBECONFIG``-style list) if one is given, else in-cluster."""
    cfg = k8s_client.Configuration()
    if kubeconfig:
        path = kubeconfig.split(os.pathsep)[0]
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: kubeconfig file not found")
        try:
            await k8s_config.load_kube_config(
                config_file=path, client_configuration=cfg, persist_config=False
            )
        except Exception as exc:  # the loader raises many types for one cause: a bad file
            raise ConfigError(f"{path}: bad kubeconfig: {one_line(exc)}") from None
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except Exception as exc:
            if master:
                cfg.host = master
            else:
                raise ConfigError(
                    "no kubeconfig given (--kubeconfig or $KUBECONFIG) and not running in a pod: "
                    f"{one_line(exc)}"
                ) from None
    if master:
        cfg.host = master.rstrip("/")
    if not str(cfg.host or "").startswith(("http://", "https://")):
        raise ConfigError(f"API server URL {cfg.host!r} must start with http:// or https://")
    return cfg


async def check_config(kubeconfig: str | None, master: str | None) -> None:
    """Validate the client configuration at start-up; raises :class:`ConfigError`."""
    await load_configuration(kubeconfig, master)


def one_line(what: object) -> str:
    text = " ".join(str(what).split())
    if not text and isinstance(what, BaseException):
        text = type(what).__name__
    return text[:300]
