# The one uproxy image: the DaemonSet in deploy/ runs it on every node, and the
# docker-compose demo stack (docker-compose.yml) runs uproxy, the project's echo server
# and its probe from it.
#   docker build -t uproxy:0.1.0 .        # or: docker compose up --build
#
# Only the official Python image. Two stages because the native splice relay (cffi, C)
# needs a compiler (and npm, to fetch the status page's charting library) at build time
# and not at run time; the runtime stage adds nftables (`nft`: uproxy's interception map,
# the default), iptables (the fallback REDIRECT chain, the filter and mangle rules), conntrack
# (stale UDP flows) and iproute2 (`ip`: transparent mode's policy routing, the node's
# addresses) and installs the wheel.
# Debian's iptables uses the nft backend, which is what current Docker hosts use too. The
# rules must land in the backend the node itself uses; on nodes still on legacy iptables,
# switch in the image with: update-alternatives --set iptables /usr/sbin/iptables-legacy
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY native ./native
COPY uproxy ./uproxy
# The status page's charting library (uPlot): its pinned version from the npm registry,
# checked against its pinned hash, into the package's static files (never committed).
COPY scripts/fetch-uplot.sh ./scripts/
RUN sh scripts/fetch-uplot.sh uproxy/status/static/vendor
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack iproute2 nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels uproxy \
 && rm -rf /wheels
EXPOSE 10249 10256
CMD ["uproxy", "--help"]
