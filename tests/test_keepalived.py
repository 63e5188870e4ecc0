"""Role keepalived: the virtual IP's checks (its filter plugin) and the VRRP instance it renders.

keepalived itself runs in the lab (molecule/cluster, case k: a failover under load); here, the
filter's verdicts on good and bad addresses, and the rendered configuration for a host of two.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from repo_helpers import REPO, render_role_templates, run_keepalived_notify

sys.path.insert(0, str(REPO / "roles" / "keepalived" / "filter_plugins"))
import keepalived_address as address

HOSTS = ["198.18.0.10", "198.18.0.11"]


def test_a_free_address_of_the_network_is_accepted() -> None:
    assert address.keepalived_address_problem("198.18.0.100", "198.18.0.10", 24, HOSTS) == ""
    assert address.keepalived_address_problem("2001:db8::100", "2001:db8::10", "64", []) == ""


@pytest.mark.parametrize(
    ("vip", "prefix", "problem"),
    [
        ("lb-vip", 24, "'lb-vip' is not an IP address"),
        ("198.18.1.100", 24, "198.18.1.100 is outside 198.18.0.0/24, the network of 198.18.0.10"),
        ("198.18.0.100", 32, "198.18.0.100 is outside 198.18.0.10/32"),
        ("198.18.0.255", 24, "198.18.0.255 is the network or broadcast address of 198.18.0.0/24"),
        ("198.18.0.11", 24, "198.18.0.11 is a host's own address"),
    ],
)
def test_a_bad_address_is_named(vip: str, prefix: int, problem: str) -> None:
    assert address.keepalived_address_problem(vip, "198.18.0.10", prefix, HOSTS).startswith(problem)


def test_the_instance_is_a_nopreempt_backup_with_unicast_peers(tmp_path: Path) -> None:
    config = tmp_path / "keepalived.conf"
    render_role_templates(
        "keepalived",
        {"keepalived.conf.j2": config},
        {
            "metalserve_address": "198.18.0.10",
            "keepalived_virtual_ip": "198.18.0.100",
            "keepalived_peers": ["198.18.0.11"],
            "keepalived_interface": "eth0",
            "keepalived_prefix": 24,
            "keepalived_priority": 200,
        },
        tmp_path,
    )
    text = config.read_text()
    instance = re.search(r"vrrp_instance (\S+) \{(.*)\n\}", text, re.S)
    assert instance is not None, text
    lines = {line.strip() for line in instance.group(2).splitlines()}
    assert {"state BACKUP", "nopreempt", "interface eth0", "priority 200", "unicast_src_ip 198.18.0.10"} <= lines
    assert "198.18.0.11" in lines
    assert "198.18.0.100/24 dev eth0" in lines
    assert re.search(r'script "/usr/bin/systemctl is-active --quiet haproxy.service"', text)


@pytest.mark.parametrize(("state", "held"), [("MASTER", 1), ("BACKUP", 0), ("FAULT", 0), ("STOP", 0)])
def test_the_notify_script_writes_whether_the_host_holds_the_address(tmp_path: Path, state: str, held: int) -> None:
    text = run_keepalived_notify(tmp_path, state)
    assert f'metalserve_vip_held{{vip="198.18.0.100",state="{state}"}} {held}\n' in text, text
    assert not list((tmp_path / "textfile").glob(".keepalived.??????")), "a temporary file was left"


def test_an_older_transition_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    """keepalived forks a notify per transition; they may finish out of order (MASTER for 60 ms,
    then BACKUP: the MASTER notify finishing last wrote MASTER, and the alert saw two holders).
    A notify older than the last writer (process start time since boot) writes nothing."""
    assert "BACKUP" in run_keepalived_notify(tmp_path, "BACKUP")
    last = tmp_path / "textfile" / ".keepalived.last"
    boot, started, pid = last.read_text().split()
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # A newer transition (a later start time) has written: this one is older.
    last.write_text(f"{boot} {int(started) + 10**9} {pid}\n")
    assert "BACKUP" in run_keepalived_notify(tmp_path, "MASTER")
    # After a reboot the kept start time means nothing: it writes.
    last.write_text(f"another-boot {int(started) + 10**9} {pid}\n")
    assert 'state="MASTER"} 1' in run_keepalived_notify(tmp_path, "MASTER")
    # In order, each writes.
    assert 'state="FAULT"} 0' in run_keepalived_notify(tmp_path, "FAULT")
