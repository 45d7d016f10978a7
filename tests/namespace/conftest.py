"""The namespace tier's guest: the real .pyz as PID 1 of a PID namespace."""

import pytest

from nsguest import NamespaceGuest


@pytest.fixture
def guest(pyz, tmp_path, namespaces):
    """guest(setup="", agent_args=(), wait_ready=True, **NamespaceGuest options) -> a started
    guest; every guest is killed at the end of the test."""
    guests = []

    def make(setup="", agent_args=(), wait_ready=True, **options):
        g = NamespaceGuest(pyz, str(tmp_path), setup=setup, agent_args=list(agent_args),
                           **options)
        guests.append(g)
        g.start()
        if wait_ready:
            g.wait_ready()
        return g

    yield make
    for g in guests:
        g.close()
