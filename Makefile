# nfqfw: bootstrap a fresh Debian 12 / Ubuntu 24.04 machine (as root), run the demo, the tests.
#
#   make demo       bootstrap, then the lab demo (real traffic through nfqfw in namespaces)
#   make test       bootstrap, then ruff and the whole pytest suite (lab tests need root)
#   make bootstrap  Debian packages (only those missing), .venv, pip install -e '.[daemon,dev]'
#   make lint       ruff check and ruff format --check
#   make lab-up     the lab with config/policy.yaml (POLICY=file to choose), left running
#   make lab-down   stop nfqfw and remove the lab's namespaces
#   make bench      the benchmark table (bench/run.py)
#   make bench-workers  one process for two queues against a worker per queue (bench/workers.py)
#   make bench-flood    floods against the kernel ruleset and nfqfw, side by side (bench/flood.py)
#   make bench-latency  other flows' ping RTT while one flow is busy, kernel against nfqfw (bench/latency.py)
#   make bench-rules    new-flow decisions/s, policy load and reload recheck for 10..10,000 rules
#   make bench-sets     a named set of 1,000..100,000 networks: load, memory, decisions, set add
#   make bench-ha       HA pair failover: traffic gap, takeover, 1,000 sessions surviving (bench/ha_failover.py)
#   make deb        dist/nfqfw_VERSION_ARCH.deb (dpkg-buildpackage; DEB_VERSION=, DIST= to choose)
#   make install    nfqfw on this machine from the checkout: /opt/nfqfw, /usr/local/bin/nfqfw,
#                   /etc/nfqfw/policy.yaml (kept if present), the systemd units, man pages, completion
#   make uninstall  takes away what install put in place, except the policy and saved state
#
# Everything is idempotent: bootstrap installs packages only when dpkg says they are missing and
# re-runs pip only when pyproject.toml changed (or .venv is new).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
POLICY ?= config/policy.yaml
PREFIX ?= nfq-
PYTEST_ARGS ?=

BIN := $(VENV)/bin
VENV_STAMP := .stamp-venv
LINT_PATHS := $(wildcard nfqfw tests bench)

# What the lab, the tests and the build need. python3-dev/python3-venv are added below only if
# the python in use lacks them (a pyenv or python.org build has both).
DEB_PACKAGES := libnetfilter-queue-dev gcc iptables iproute2 procps conntrack iputils-ping \
	netcat-openbsd nmap iperf3 tcpdump ruby systemd strace hping3 groff-base man-db tmux \
	keepalived conntrackd $(DEB_BUILD_PACKAGES)
# What `make deb` needs (the package is built on Debian's own python3, whatever PYTHON is).
DEB_BUILD_PACKAGES := dpkg-dev debhelper build-essential python3-dev python3-venv

.PHONY: help bootstrap debs demo test lint lab-up lab-down bench bench-workers bench-flood bench-latency bench-rules bench-sets bench-ha deb wheelhouse docs \
	install uninstall clean

help:
	@sed -n '1,/^#   make uninstall/s/^# \{0,1\}//p' Makefile

bootstrap: debs $(VENV_STAMP)

# Install only what dpkg does not report as installed; `apt-get update` once, only then.
# The HA lab runs its own conntrackd in each gateway namespace: the packaged service, which
# would track the root namespace's table, is stopped and disabled when apt has just installed it
# (keepalived's does not start without /etc/keepalived/keepalived.conf).
debs:
	@wanted="$(DEB_PACKAGES)"; \
	if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then wanted="$$wanted python3-venv"; fi; \
	if ! $(PYTHON) -c 'import os, sysconfig; \
		raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
		2>/dev/null; then wanted="$$wanted python3-dev"; fi; \
	missing=""; \
	for pkg in $$wanted; do \
		status=$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true); \
		[ "$$status" = "install ok installed" ] || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then echo "bootstrap: Debian packages present"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "bootstrap: missing packages:$$missing; run as root" >&2; exit 1; fi; \
	echo "bootstrap: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q; \
	apt-get install -y -q --no-install-recommends $$missing; \
	if [[ " $$missing " == *" conntrackd "* ]] && [ -d /run/systemd/system ]; then \
		systemctl disable --now conntrackd.service || true; \
	fi

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

# pyvenv.cfg is a plain file written when the venv is made (bin/python is a symlink to an old
# interpreter, useless as a timestamp): a new venv gets the install too.
$(VENV_STAMP): pyproject.toml $(VENV)/pyvenv.cfg | debs
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q -e '.[daemon,dev]'
	touch $@

demo: bootstrap
	$(BIN)/nfqfw lab demo

test: bootstrap lint
	$(BIN)/pytest -ra $(PYTEST_ARGS)

lint: bootstrap
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

lab-up: bootstrap
	$(BIN)/nfqfw lab up --policy $(POLICY) --prefix $(PREFIX)

lab-down: bootstrap
	$(BIN)/nfqfw lab down --prefix $(PREFIX)

bench: bootstrap
	$(BIN)/python bench/run.py

bench-workers: bootstrap
	$(BIN)/python bench/workers.py --runs 2

bench-flood: bootstrap
	$(BIN)/python bench/flood.py

bench-latency: bootstrap
	$(BIN)/python bench/latency.py

bench-rules: bootstrap
	$(BIN)/python bench/rule_scaling.py

bench-sets: bootstrap
	$(BIN)/python bench/set_scaling.py

bench-ha: bootstrap
	$(BIN)/python bench/ha_failover.py --sessions 1000

# --- the Debian package ------------------------------------------------------------------------
# dpkg-buildpackage runs in a copy of the sources under build/deb (it writes next to the tree it
# builds); debian/changelog is written there from DEB_VERSION (pyproject's version by default),
# so the version is defined once. The dependencies are downloaded and built once into
# build/wheelhouse (again only when pyproject.toml changes): a second build takes them from there.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
DEB_VERSION ?= $(VERSION)
DEB_ARCH = $(shell dpkg --print-architecture)
DIST ?= dist
DEB_BUILD := build/deb
WHEELHOUSE := build/wheelhouse
DEB_SOURCES := pyproject.toml README.md nfqfw config systemd debian

deb: debs $(WHEELHOUSE)/.stamp
	rm -rf $(DEB_BUILD)/nfqfw-$(DEB_VERSION)
	mkdir -p $(DEB_BUILD)/nfqfw-$(DEB_VERSION) $(DIST)
	tar -c --exclude=__pycache__ $(DEB_SOURCES) | tar -x -C $(DEB_BUILD)/nfqfw-$(DEB_VERSION)
	printf 'nfqfw (%s) unstable; urgency=medium\n\n  * Built from the nfqfw source tree.\n\n -- %s  %s\n' \
		'$(DEB_VERSION)' 'nfqfw developers <nfqfw@localhost>' "$$(date -R)" \
		> $(DEB_BUILD)/nfqfw-$(DEB_VERSION)/debian/changelog
	cd $(DEB_BUILD)/nfqfw-$(DEB_VERSION) && NFQFW_WHEELHOUSE=$(abspath $(WHEELHOUSE)) \
		dpkg-buildpackage -b -us -uc --no-sign > ../build-$(DEB_VERSION).log 2>&1 \
		|| { tail -40 ../build-$(DEB_VERSION).log >&2; exit 1; }
	mv $(DEB_BUILD)/nfqfw_$(DEB_VERSION)_$(DEB_ARCH).deb $(DIST)/
	@echo "deb: $(DIST)/nfqfw_$(DEB_VERSION)_$(DEB_ARCH).deb"

# The wheels of nfqfw's dependencies, for installs that must not reach an index (the box).
wheelhouse: $(WHEELHOUSE)/.stamp

$(WHEELHOUSE)/.stamp: pyproject.toml | debs
	rm -rf $(WHEELHOUSE) build/wheel-venv
	/usr/bin/python3 -m venv build/wheel-venv
	build/wheel-venv/bin/pip wheel --disable-pip-version-check -q --wheel-dir $(WHEELHOUSE) \
		'.[daemon]' 'setuptools>=64' wheel
	rm -f $(WHEELHOUSE)/nfqfw-*.whl
	touch $@

# The man pages and the bash completion, generated from the code (python -m nfqfw.docs).
docs: bootstrap
	$(BIN)/python -m nfqfw.docs build/docs

# --- installing on a gateway from the checkout --------------------------------------------------
# DESTDIR stages the files elsewhere (packaging, tests); the paths written into them stay the
# real ones. The venv keeps nfqfw and its dependencies away from the system's Python (PEP 668).
INSTALL_VENV ?= /opt/nfqfw
INSTALL_BIN ?= /usr/local/bin
INSTALL_ETC ?= /etc/nfqfw
INSTALL_UNIT_DIR ?= /etc/systemd/system
INSTALL_DOC ?= /usr/share/doc/nfqfw
INSTALL_MAN ?= /usr/local/share/man
INSTALL_COMPLETION ?= /usr/local/share/bash-completion/completions
DESTDIR ?=
# The service's Python is the system's: one under /root or /home (pyenv, a python.org build) is
# hidden from the service by the unit's ProtectHome=yes, and the service would not start.
INSTALL_PYTHON ?= $(firstword $(wildcard /usr/bin/python3) $(PYTHON))
# e.g. "--no-index --find-links=build/wheelhouse" to install from `make wheelhouse` alone.
INSTALL_PIP_FLAGS ?=

install:
	$(MAKE) --no-print-directory debs PYTHON=$(INSTALL_PYTHON)
	$(INSTALL_PYTHON) -m venv --clear $(DESTDIR)$(INSTALL_VENV)
	$(DESTDIR)$(INSTALL_VENV)/bin/pip install --disable-pip-version-check -q $(INSTALL_PIP_FLAGS) '.[daemon]'
	install -d -m 0755 $(DESTDIR)$(INSTALL_BIN) $(DESTDIR)$(INSTALL_DOC)
	ln -sfn $(INSTALL_VENV)/bin/nfqfw $(DESTDIR)$(INSTALL_BIN)/nfqfw
	install -d -m 0755 $(DESTDIR)$(INSTALL_ETC)
	@if [ -e $(DESTDIR)$(INSTALL_ETC)/policy.yaml ]; then \
		echo "install: keeping the existing $(INSTALL_ETC)/policy.yaml"; \
	else \
		install -m 0600 config/policy.yaml $(DESTDIR)$(INSTALL_ETC)/policy.yaml; \
		echo "install: $(INSTALL_ETC)/policy.yaml written from config/policy.yaml: edit its zones first"; \
	fi
	install -D -m 0644 systemd/nfqfw.service $(DESTDIR)$(INSTALL_UNIT_DIR)/nfqfw.service
	install -m 0644 systemd/nfqfw-closed.service $(DESTDIR)$(INSTALL_UNIT_DIR)/nfqfw-closed.service
	install -m 0644 README.md $(DESTDIR)$(INSTALL_DOC)/README.md
	$(DESTDIR)$(INSTALL_VENV)/bin/python -m nfqfw.docs $(DESTDIR)$(INSTALL_VENV)/share/doc
	install -D -m 0644 $(DESTDIR)$(INSTALL_VENV)/share/doc/nfqfw.8 $(DESTDIR)$(INSTALL_MAN)/man8/nfqfw.8
	install -D -m 0644 $(DESTDIR)$(INSTALL_VENV)/share/doc/nfqfw-policy.5 $(DESTDIR)$(INSTALL_MAN)/man5/nfqfw-policy.5
	install -D -m 0644 $(DESTDIR)$(INSTALL_VENV)/share/doc/nfqfw.bash-completion \
		$(DESTDIR)$(INSTALL_COMPLETION)/nfqfw
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "install: done. Next: edit $(INSTALL_ETC)/policy.yaml, 'nfqfw check $(INSTALL_ETC)/policy.yaml',"
	@echo "         then 'systemctl enable --now nfqfw'"

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl disable --now nfqfw nfqfw-closed 2>/dev/null || true; \
	fi
	@# Without the daemon, rules left in fail-closed mode would block the gateway's traffic.
	@if [ -z "$(DESTDIR)" ] && [ -x $(INSTALL_BIN)/nfqfw ]; then $(INSTALL_BIN)/nfqfw rules remove; fi
	rm -f $(DESTDIR)$(INSTALL_UNIT_DIR)/nfqfw.service $(DESTDIR)$(INSTALL_UNIT_DIR)/nfqfw-closed.service \
		$(DESTDIR)$(INSTALL_BIN)/nfqfw
	rm -f $(DESTDIR)$(INSTALL_MAN)/man8/nfqfw.8 $(DESTDIR)$(INSTALL_MAN)/man5/nfqfw-policy.5
	rm -f $(DESTDIR)$(INSTALL_COMPLETION)/nfqfw
	rm -rf $(DESTDIR)$(INSTALL_VENV) $(DESTDIR)$(INSTALL_DOC)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "uninstall: kept $(INSTALL_ETC) and /var/lib/nfqfw"

clean:
	rm -rf $(VENV) $(VENV_STAMP) .pytest_cache .ruff_cache nfqfw.egg-info build dist
