"""The Kubernetes API source, by concept.

``config`` (client configuration, checked at start), ``backoff`` (retry delays
and the log limiter), ``reflector`` (list+watch of one resource) and
``source`` (:class:`KubeSource`: Services, EndpointSlices and this Node into
the store). The names other packages use are re-exported here.
"""

from uproxy.settings import KubeSettings
from uproxy.sources.kube.config import ConfigError, check_config, load_configuration
from uproxy.sources.kube.source import (
    ORIGIN,
    TO_BE_DELETED_TAINT,
    WATCHED,
    ZONE_LABEL,
    KubeSource,
)

__all__ = [
    "ORIGIN",
    "TO_BE_DELETED_TAINT",
    "WATCHED",
    "ZONE_LABEL",
    "ConfigError",
    "KubeSettings",
    "KubeSource",
    "check_config",
    "load_configuration",
]
