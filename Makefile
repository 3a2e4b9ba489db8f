# uproxy — the two commands: `make demo` and `make test` (as root, on Debian).
# Both install what is missing first; when everything is there they go straight to work.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Debian packages the lab, the tests, the demo and the benchmark use (binary -> package).
TOOLS := ip:iproute2 iptables:iptables conntrack:conntrack nginx:nginx dnsmasq:dnsmasq-base \
         dig:dnsutils iperf3:iperf3 curl:curl socat:socat ss:iproute2 gcc:gcc \
         chromium:chromium npm:npm nft:nftables
NGINX_STREAM := /usr/lib/nginx/modules/ngx_stream_module.so

.PHONY: all test demo bench deps apt venv lint unit clean

all: test

deps: apt venv

apt:
	@missing=""; \
	for pair in $(TOOLS); do bin=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing="$$missing $$pkg"; done; \
	[ -e $(NGINX_STREAM) ] || missing="$$missing libnginx-mod-stream"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "uproxy: installing packages needs root: run make as root" >&2; exit 2; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The status page's charting library (uPlot), fetched at its pinned version and checked
# against its pinned hash by scripts/fetch-uplot.sh; never committed.
UPLOT := uproxy/status/static/vendor/uPlot.VERSION

venv: $(STAMP) $(UPLOT)

$(UPLOT): scripts/fetch-uplot.sh
	sh scripts/fetch-uplot.sh

$(STAMP): pyproject.toml setup.py uproxy/_native_build.py $(wildcard native/*.c native/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel cffi
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	@touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check uproxy tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: deps lint
	$(PY) -m pytest -ra

unit: venv
	$(PY) -m pytest -ra -m "not lab"

demo: deps
	$(PY) -m uproxy demo

bench: deps
	$(PY) -m bench $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf $(VENV) build *.egg-info uproxy/_native*.so uproxy/_native.c
