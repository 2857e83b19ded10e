# wgcni — build, test, benchmark and demo entry points.
# `make test` and `make demo` do all set-up on a fresh Debian 12 machine as root.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMPS      := .build/stamps
PYTEST_ARGS ?=

APT_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev make \
	iproute2 iputils-ping procps kmod xz-utils cpio \
	wireguard-go wireguard-tools nftables iptables tcpdump iperf3 \
	containerd runc containernetworking-plugins \
	golang-go golang-github-appc-cni-dev \
	qemu-system-x86 \
	mmdebstrap buildah

.PHONY: all deps venv build image lint test test-host test-vm bench chaos demo demo-down clean

all: build

$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(APT_PACKAGES) 2>/dev/null | awk '$$4!="installed"{print $$1}'; \
	  for p in $(APT_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done | sort -u); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

deps: $(STAMPS)/apt

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMPS)/venv

build: $(STAMPS)/venv
	PY=$(PY) bash packaging/build.sh

# The DaemonSet's image as an OCI archive, built from Debian packages and dist/ without a registry (packaging/image.sh),
# cached by content in .build/lab-cache/image/; prints its size per part.
image: build
	$(PY) -m wgcni_lab.image

# The checkers configured in pyproject.toml: lint rules, the import contracts of the layers, types.
lint: $(STAMPS)/venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The host suite, then the kernel WireGuard tests inside a qemu VM running Debian's kernel (tests/vm/README.md).
test: test-host test-vm

# Two pytest-xdist workers, each running whole test files (--dist loadfile: a file's module-scoped lab or API
# server stays in one worker); PYTEST_WORKERS=0 runs the suite in this process (docs/development.md, "Test time").
PYTEST_WORKERS ?= 2

test-host: lint build
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-vm: build
	$(PY) tests/vm/kernel_vm.py pytest

bench: build
	$(PY) -m bench.run
	$(PY) -m bench.plot

# The reliability campaign (wgcni_lab/chaos.py) on a lab of its own: 1 000 pod ADD/DEL with hooks killed -9, API
# faults, every kind of tampering, restarts; report in .build/chaos/report.json (docs/reliability.md).
chaos: build
	$(PY) -m wgcni_lab.chaos

# The local lab (wgcni_lab): 3 nodes x 2 pods, cross-node pings, a capture of the VNet bridge; left running.
demo: build
	$(PY) -m wgcni_lab.demo

demo-down: $(STAMPS)/venv
	$(PY) -m wgcni_lab.cli down

clean:
	rm -rf build dist .build
