"""GetSystemInfo's address list from fixture copies of /proc/net/fib_trie and
/proc/net/if_inet6 (taken from a real machine, then trimmed for the other cases)."""

import os

import pytest

import agent

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def read(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


@pytest.mark.parametrize("case,expected", [
    ("dual_stack", ["192.0.2.2", "fd00::2"]),   # link-local fe80:: and loopback left out
    ("ipv4_only", ["192.0.2.2"]),
    ("none", []),                                # only lo: nothing routable to report
])
def test_ip_addresses_from_proc_files(case, expected):
    assert agent.ip_addresses(read("fib_trie." + case), read("if_inet6." + case)) == expected


def test_an_address_listed_in_both_tables_is_reported_once():
    # fib_trie lists local addresses under both Main: and Local:
    assert read("fib_trie.dual_stack").count("|-- 192.0.2.2\n") == 2
    assert agent.ip_addresses(read("fib_trie.dual_stack"), "") == ["192.0.2.2"]


def test_garbage_in_the_proc_files_is_ignored():
    assert agent.ip_addresses("|--\n/32 host LOCAL\nnonsense", "zz 01 02\n\n") == []
