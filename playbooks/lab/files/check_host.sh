#!/usr/bin/env bash
# Try, before any lab node is built, what the lab needs from this host: the
# commands, podman with the runc runtime, a bridge network of the lab's kind
# and name resolution between two containers on it, started with the lab
# nodes' podman options. Each problem is named with what fixes it.
#
# usage: check_host.sh NETWORK SUBNET GATEWAY NOFILE NPROC
# Creates NETWORK when absent (as the lab itself would) and leaves it; the two
# probe containers are removed. Needs no image: the probes run on the host's
# own root, read-only under an overlay (podman --rootfs /:O).
set -uo pipefail

network=$1 subnet=$2 gateway=$3 nofile=$4 nproc=$5
probe=metalserve-hostcheck
fix="run 'make host-deps', or apt-get install the package named"
problems=()

fail() {
  printf 'lab host check failed:\n' >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 1
}

# command or file -> the Debian package that provides it
declare -A needs=(
  [podman]=podman
  [runc]=runc
  [/usr/lib/podman/netavark]=netavark
  [/usr/lib/podman/aardvark-dns]=aardvark-dns
  [iptables]=iptables
  [debootstrap]=debootstrap
  [ssh]=openssh-client
  [flock]=util-linux
)
for what in "${!needs[@]}"; do
  if [[ $what == /* ]]; then
    [[ -x $what ]] && continue
  else
    command -v "$what" >/dev/null && continue
  fi
  problems+=("$what is missing: package ${needs[$what]} ($fix)")
done
python3 -c 'import ensurepip, venv' 2>/dev/null \
  || problems+=("python3 cannot create virtual environments: package python3-venv ($fix)")
((${#problems[@]})) && fail

backend=$(podman info --format '{{.Host.NetworkBackend}}' 2>&1) \
  || { problems+=("podman does not run: $backend"); fail; }
[[ $backend == netavark ]] \
  || problems+=("podman's network backend is '$backend', the lab needs netavark: package netavark, and no CNI networks left in /etc/cni/net.d")
((${#problems[@]})) && fail

cleanup() { podman rm --ignore --force --time 0 "$probe-a" "$probe-b" >/dev/null 2>&1; }
trap cleanup EXIT
cleanup

if ! podman network exists "$network"; then
  out=$(podman network create --subnet "$subnet" --gateway "$gateway" "$network" 2>&1) \
    || { problems+=("cannot create the lab network $network ($subnet): $out"); fail; }
fi

# The lab nodes' options (playbooks/lab/create.yml, "Start the nodes").
node_opts=(--runtime runc --privileged --network "$network"
  --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc"
  --label metalserve.lab.check=true --rootfs /:O)

out=$(podman run --detach --name "$probe-a" --network-alias "$probe-a" \
  --stop-signal SIGKILL "${node_opts[@]}" sleep 60 2>&1) || {
  case $out in
    *netavark*"No such file"*) hint="netavark cannot set up the network; is package iptables installed? ($fix)" ;;
    *rlimit*) hint="the host refuses the nodes' ulimits nofile=$nofile nproc=$nproc; set lab_node_nofile / lab_node_nproc lower (inventories/lab/group_vars/all/lab.yml)" ;;
    *runc*) hint="the runc runtime fails: package runc ($fix)" ;;
    *) hint="see podman's error above" ;;
  esac
  problems+=("a container with the lab nodes' options does not start on $network: $out" "$hint")
  fail
}

out=$(timeout 60 podman run --rm --name "$probe-b" "${node_opts[@]}" \
  getent hosts "$probe-a" 2>&1) \
  || problems+=("containers on $network cannot resolve each other by name (aardvark-dns): ${out:-no answer}; package aardvark-dns ($fix)")
((${#problems[@]})) && fail
echo "lab host check passed: podman (runc, netavark), network $network, name resolution between containers"
