"""`make run`'s sample users: a newcomer logs in with what it prints.

The users are made with the product's user database and log in through
the product's Authenticator; every start gives them new passwords (the old
ones stop working), and their roles and addresses are what README.md says.
"""

from __future__ import annotations

import pytest

from mailtresor.access.auth import Authenticator, LoginFailed, open_databases
from mailtresor.keys.client import control_fetcher
from tests.harness import devstack
from tests.harness.stack import Stack


@pytest.fixture
def control(tmp_path):
    s = Stack(tmp_path / "stack", {"archive": {"enabled": True}}, milter=False)
    s.start_control()
    yield s
    s.close()


def test_sample_users_log_in_with_the_printed_passwords(control):
    cfg = control.cfg
    made = devstack.sample_users(cfg)
    assert [(t, n, r) for t, n, r, _, _ in made] == [
        ("acme", "alice", ("user",)), ("acme", "audrey", ("auditor",)), ("acme", "arthur", ("auditor",)),
        ("acme", "adam", ("admin",)),
        ("globex", "gina", ("user",)), (None, "olga", ("appliance-admin",))]
    users, tokens = open_databases(cfg, control_fetcher(cfg))
    auth = Authenticator(cfg, users, tokens)
    for tenant, name, roles, addresses, password in made:
        who = auth.login(tenant=tenant, username=name, password=password, totp=None, client="127.0.0.1")
        assert (who.tenant, who.name, set(who.roles), set(who.addresses)) == (tenant, name, set(roles),
                                                                              set(addresses))
    # The next start: new passwords; the old ones no longer open anything.
    again = devstack.sample_users(cfg)
    users, tokens = open_databases(cfg, control_fetcher(cfg))
    auth = Authenticator(cfg, users, tokens)
    old = {n: p for _, n, _, _, p in made}
    for i, (tenant, name, _, _, password) in enumerate(again):
        assert password != old[name]
        with pytest.raises(LoginFailed):
            # One client per user: the throttle counts a client's failures.
            auth.login(tenant=tenant, username=name, password=old[name], totp=None, client=f"127.0.1.{i + 1}")
        assert auth.login(tenant=tenant, username=name, password=password, totp=None, client="127.0.0.3").name == name
