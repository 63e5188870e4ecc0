# The commands the README names. Everything they need is installed here:
# host packages with apt, Python tools into .venv from requirements/constraints.txt.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# molecule and ansible-lint call ansible-* by name: the venv comes first.
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# What the host needs, the one list (README "The two commands").
HOST_PACKAGES := podman runc netavark aardvark-dns iptables debootstrap openssh-client haproxy socat python3-venv
# torch's CPU wheel (see shared/LAB.md); pip also looks here through its config.
TORCH_WHEELS ?= /opt/wheels
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
TORCH_FIND_LINKS_ARG := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS),)
LAB_INVENTORY := inventories/lab
# One lab per machine (one 198.18.0.0/24 network): whatever builds or tears
# down lab nodes (make lab, molecule) holds this lock.
LAB_LOCK := /tmp/metalserve-lab.lock
PLAYBOOKS := $(wildcard playbooks/*.yml playbooks/lab/*.yml) awx/configure.yml

.PHONY: help deps host-deps gpu-wheels lab lab-down test checks lint syntax pytest molecule constraints clean

help:
	@echo "make lab       build the podman lab and provision it end to end"
	@echo "make lab-down  remove the lab's nodes and network"
	@echo "make test      lint, pytest and every molecule scenario"
	@echo "make lint | syntax | pytest | molecule   one stage of make test"

## Installation ###############################################################

host-deps:
	@missing=$$(for p in $(HOST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing host packages: $$missing"; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Rebuilt whenever a pin or the serving package's metadata changes.
$(VENV)/.installed: requirements/constraints.txt requirements/dev.in requirements/serving.in files/serving/pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_FIND_LINKS_ARG) -c requirements/constraints.txt \
	  -r requirements/dev.in -r requirements/serving.in
	$(BIN)/pip install -q --no-deps -e files/serving
	@touch $@

# promtool (checks and unit-tests the alert rules) and Alertmanager with amtool
# (routes, silences) from Debian's packages, unpacked here: no server of theirs
# runs on this machine.
PROMETHEUS_DEBS := prometheus prometheus-alertmanager
PROMTOOL := .cache/promtool/usr/bin/promtool
AMTOOL := .cache/promtool/usr/bin/amtool
$(PROMTOOL) $(AMTOOL) &:
	rm -rf .cache/promtool && mkdir -p .cache/promtool
	cd .cache/promtool && { apt-get download $(PROMETHEUS_DEBS) 2>/dev/null \
	  || { $(SUDO) apt-get update -qq && apt-get download $(PROMETHEUS_DEBS); }; }
	for deb in .cache/promtool/*.deb; do dpkg-deb -x "$$deb" .cache/promtool; done
	rm -f .cache/promtool/*.deb
	@touch $(PROMTOOL) $(AMTOOL)

deps: host-deps $(VENV)/.installed $(PROMTOOL) $(AMTOOL)

# Re-resolve every pin from the .in files in a scratch venv.
constraints:
	rm -rf .cache/constraints-venv && python3 -m venv .cache/constraints-venv
	.cache/constraints-venv/bin/pip install -q $(TORCH_FIND_LINKS_ARG) -r requirements/dev.in -r requirements/serving.in
	{ sed -n '1,2p' requirements/constraints.txt; .cache/constraints-venv/bin/pip freeze; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

# Wheels of what the GPU machines' image lacks (its python3 is 3.12, with torch, transformers,
# httpx, uvloop and prometheus-client; nothing can be fetched there), pinned as here. The device
# tool carries .whl with a call; files/serving/bench/on_gpu.sh installs them there.
GPU_PYTHON := 3.12
GPU_WHEELS := fastapi starlette annotated-doc uvicorn httptools pydantic pydantic_core \
  pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions blake3 \
  opentelemetry-api
# A sampling profiler for a replica's start there (files/serving/bench/spy_report.py reads its
# output); a tool, not a dependency, so pinned here.
GPU_TOOLS := py-spy==0.4.3
GPU_PLATFORMS := $(foreach n,2_17 2_27 2_28,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: deps
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --implementation cp \
	  --python-version $(GPU_PYTHON) $(GPU_PLATFORMS) -c requirements/constraints.txt -d .whl $(GPU_WHEELS) $(GPU_TOOLS)
	@ls .whl

## The lab #####################################################################

# lab_root of inventories/lab; the tiny model the lab serves lives there (its
# version id is pinned in inventories/lab/group_vars/gpu_nodes/replica.yml).
LAB_ROOT := /var/lib/metalserve-lab
TINY_MODEL := $(LAB_ROOT)/tiny-model-seed1

# One lock for the whole build: a molecule run must not destroy the nodes
# between two of its steps.
lab: deps
	exec 9>$(LAB_LOCK); flock 9; \
	ansible-playbook -i $(LAB_INVENTORY) playbooks/lab/create.yml; \
	ansible-playbook -i $(LAB_INVENTORY) playbooks/lab/alert_sink.yml; \
	metalserve make-tiny-model $(TINY_MODEL) --seed 1; \
	ansible-playbook -i $(LAB_INVENTORY) playbooks/publish_model.yml -e model_dir=$(TINY_MODEL); \
	ansible-playbook -i $(LAB_INVENTORY) playbooks/site.yml; \
	ansible-playbook -i $(LAB_INVENTORY) playbooks/verify.yml; \
	ansible-playbook -i $(LAB_INVENTORY) playbooks/lab/rollout_demo.yml; \
	ansible-playbook -i $(LAB_INVENTORY) playbooks/lab/usage.yml
	@cat $(LAB_ROOT)/ROLLOUT.txt $(LAB_ROOT)/USAGE.txt

lab-down: deps
	flock $(LAB_LOCK) ansible-playbook -i $(LAB_INVENTORY) playbooks/lab/destroy.yml

## Tests #######################################################################

# The molecule scenarios take most of the time and have the lab to themselves;
# lint, syntax and pytest need no lab, so they run beside them (two jobs).
# molecule first: with two job slots, naming checks first started lint and syntax
# before it, and molecule (the longer) waited for them.
test: deps
	$(MAKE) --no-print-directory -j2 molecule checks

checks: lint syntax pytest

lint: deps
	yamllint --strict .
	ansible-lint
	ruff check .
	ruff format --check .
	mypy --config-file files/serving/pyproject.toml files/serving/src

syntax: deps
	@for pb in $(PLAYBOOKS); do \
	  ansible-playbook -i $(LAB_INVENTORY) --syntax-check "$$pb" >/dev/null || exit 1; \
	  echo "syntax ok: $$pb"; done

pytest: deps
	pytest

molecule: deps
	flock $(LAB_LOCK) molecule test --all

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
