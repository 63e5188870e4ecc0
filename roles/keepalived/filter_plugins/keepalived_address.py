"""Filter for role keepalived: is the virtual IP a usable address of an interface's network?

    vip | keepalived_address_problem(interface_address, prefix, host_addresses)
        -> '' when usable, else why not (one sentence)

The standard library's ipaddress: ansible.utils' ipaddr filters need netaddr on the controller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any


def keepalived_address_problem(vip: str, interface_address: str, prefix: Any, host_addresses: Iterable[str]) -> str:
    try:
        address = ipaddress.ip_address(str(vip))
    except ValueError:
        return f"'{vip}' is not an IP address"
    try:
        network = ipaddress.ip_interface(f"{interface_address}/{int(prefix)}").network
    except ValueError:
        return f"'{interface_address}/{prefix}' is not an interface address"
    if address not in network:
        return f"{vip} is outside {network}, the network of {interface_address}"
    if address in (network.network_address, network.broadcast_address) and network.prefixlen < 31:
        return f"{vip} is the network or broadcast address of {network}"
    if str(address) in {str(a) for a in host_addresses}:
        return f"{vip} is a host's own address"
    return ""


class FilterModule:
    def filters(self) -> dict[str, Callable[..., str]]:
        return {"keepalived_address_problem": keepalived_address_problem}
