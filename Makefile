# mqvpn — everything a fresh machine needs is installed from here.
#   make test   install (venv from PyPI, Debian packages) and run every test
#   make demo   show the main job working on this machine
#   make bench  the benchmarks in bench/ (not part of the tests)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages the tests use (command -> package).
DEB_CMDS := ip:iproute2 nft:nftables iperf3:iperf3 ping:iputils-ping tcpdump:tcpdump

.PHONY: test demo bench venv debs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

debs:
	@missing=""; for pair in $(DEB_CMDS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (tests needing them are skipped)"; fi; \
	fi

test: venv debs
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: venv debs
	$(PY) demo/namespace_lab.py

bench: venv
	$(PY) bench/datagram_throughput.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
