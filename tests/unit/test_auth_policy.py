"""The policy table covers every RPC, and tokens are checked on every call."""

from __future__ import annotations

import pytest

from vmattach.common import auth
from vmattach.common.db import open_database
from vmattach.common.errors import InvalidArgument, Unauthenticated
from vmattach.v1 import controller_pb2, node_pb2, servers_pb2


def all_methods() -> list[str]:
    out = []
    for module, name in ((controller_pb2, "Controller"), (node_pb2, "Node"),
                         (servers_pb2, "Servers")):
        service = module.DESCRIPTOR.services_by_name[name]
        out += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return out


def test_every_rpc_has_an_explicit_rule():
    missing = [m for m in all_methods() if m not in auth.POLICY]
    assert not missing, f"add these RPCs to common/auth.py POLICY: {missing}"


def test_every_node_rpc_is_internal_and_users_change_only_through_public_rpcs():
    for method in all_methods():
        rule = auth.POLICY[method]
        if "/vmattach.v1.Node/" in method:
            assert rule.audience == "internal", method
        if rule.audience == "public" and rule.changes:
            assert rule.role == "member", method


@pytest.fixture
def store(tmp_path):
    return auth.TokenStore(open_database(f"sqlite:///{tmp_path / 'auth.db'}", auth.MODELS))


def test_a_token_is_shown_once_and_only_its_hash_is_kept(store, tmp_path):
    text, row = store.create("project-a", "reader")
    secret = text.rsplit(".", 1)[1]
    assert secret not in (tmp_path / "auth.db").read_bytes().decode("latin-1")
    caller = store.verify(f"Bearer {text}")
    assert (caller.kind, caller.project, caller.role) == ("user", "project-a", "reader")


@pytest.mark.parametrize("header", ["", "Bearer", "Basic abc", "Bearer vmat.0123456789abcdef.x",
                                    "Bearer " + "a" * 400])
def test_malformed_tokens_are_unauthenticated(store, header):
    with pytest.raises(Unauthenticated):
        store.verify(header)


def test_a_token_with_a_wrong_secret_or_revoked_is_refused(store):
    text, row = store.create("p", "member")
    with pytest.raises(Unauthenticated):
        store.verify("Bearer " + text[:-4] + "AAAA")
    store.revoke(row.id)
    with pytest.raises(Unauthenticated):
        store.verify("Bearer " + text)


@pytest.mark.parametrize("project,role", [("", "member"), ("a/b", "member"), ("p", "root")])
def test_bad_projects_and_roles_are_refused(store, project, role):
    with pytest.raises(InvalidArgument):
        store.create(project, role)


def test_what_each_caller_sees():
    member = auth.Caller("user", "t", "a", "member")
    admin = auth.Caller("user", "t", "a", "admin")
    assert member.sees("a") and not member.sees("b") and not member.sees("")
    assert admin.sees("b") and admin.sees("")
    assert member.list_scope(all_projects=True) == "a"
    assert admin.list_scope() == "a" and admin.list_scope(all_projects=True) is None
    assert auth.SYSTEM.list_scope() is None
