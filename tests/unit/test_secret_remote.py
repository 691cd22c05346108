"""`lab secret …`, `lab get secrets` and `lab show secret` in a connected home, in-process: the
daemon's ``secrets.*`` methods (coordinator/secrets_api.py) reached over in-memory streams (the
``daemon`` fixture of test_remote_lifecycle.py), the stores faked at ``store.meta`` / ``store.set``.
Pure parts: the definition's wire form, the store list, the store fields of `lab show secret`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from hypothesis import given
from hypothesis import strategies as st
from test_remote_lifecycle import daemon, peer_with_roles  # noqa: F401  (the fixture, reused)
from test_store_cli import Stdin

from lab.common import wire
from lab.common.config.model import Secret
from lab.common.errors import NotEntitled, NotFound, RemoteProtocolError
from lab.coordinator import cluster
from lab.coordinator.cli import secret_cmd
from lab.coordinator.cli.app import run
from lab.coordinator.secrets_api import METHODS, secret_from_wire, secret_to_wire

PG = "postgres/master-password"
STORES = ["127.0.0.1:7001", "127.0.0.1:7002"]

# -- pure parts ---------------------------------------------------------------------------------

_opt_int = st.none() | st.integers(min_value=0, max_value=10**9)
secrets_st = st.builds(
    Secret, path=st.from_regex(r"[a-z]{1,8}(/[a-z0-9_.-]{1,8}){0,2}", fullmatch=True),
    type=st.sampled_from(["static", "dynamic"]), generator=st.none() | st.sampled_from(["random", "password"]),
    rotate_every=_opt_int, per_machine=st.booleans(), owner=st.text(min_size=1, max_size=8),
    group=st.text(min_size=1, max_size=8), mode=st.integers(0, 0o7777), set_by=st.none() | st.text(max_size=8), ttl=_opt_int,
)  # fmt: skip


@given(secrets_st)
def test_definition_wire_round_trip(s: Secret) -> None:
    sent = json.loads(json.dumps(secret_to_wire(s)))  # as the daemon replies
    assert secret_from_wire(wire.unpackb_untrusted(wire.packb(sent))) == s


@pytest.mark.parametrize("change", [
    lambda d: d.pop("mode"), lambda d: d.update(extra=1), lambda d: d.update(mode="0600"),
    lambda d: d.update(per_machine=1), lambda d: d.update(ttl=True), lambda d: d.update(owner=None),
])  # fmt: skip
def test_definition_decoder_is_strict(change: Any) -> None:
    d = secret_to_wire(Secret(PG, owner="postgres", mode=0o600))
    change(d)
    with pytest.raises(RemoteProtocolError):
        secret_from_wire(d)
    with pytest.raises(RemoteProtocolError):
        secret_from_wire([PG])


def test_store_list_this_home_first_each_once() -> None:
    assert secret_cmd.merge_stores(["a:1", "b:2"], ["b:2", "c:3"]) == ["a:1", "b:2", "c:3"]
    assert secret_cmd.merge_stores([], []) == []
    for bad in (None, "a:1", [1]):
        with pytest.raises(RemoteProtocolError):
            secret_cmd.merge_stores([], bad)


def test_store_fields_of_show_secret() -> None:
    records = {"tls/node-cert@web-1": {"set_at": 1_700_000_000_000, "set_by": "ann", "version": 5},
               "tls/node-cert@web-2": {"set_at": 1_700_000_060_000, "set_by": "bob", "version": 6}}
    got = secret_cmd.store_fields(records, "tls/node-cert", ["web-1", "web-3"])
    assert got == {"per_machine_set": [{"server": "web-1", "set": True}, {"server": "web-3", "set": False}],
                   "last_set": "2023-11-14 22:14", "last_set_by": "bob", "store_known": True}
    assert secret_cmd.store_fields(None, PG, None) == {"per_machine_set": None, "last_set": None, "last_set_by": None,
                                                       "store_known": False}
    assert secret_cmd.store_fields(None, "x", ["a"])["per_machine_set"] == [{"server": "a", "set": None}]


# -- the daemon's methods and the CLI over them -------------------------------------------------


@pytest.fixture()
def connected(daemon: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:  # noqa: F811
    """The daemon's home lists two stores and has db-1 (postgres); the stores answer from memory."""
    engine, coordinator, cli = daemon
    home = engine.paths.home
    settings = yaml.safe_load((home / "config.yaml").read_text()) if (home / "config.yaml").exists() else {}
    (home / "config.yaml").write_text(yaml.safe_dump({**(settings or {}), "stores": STORES}))
    engine.add_server("db-1", "ssh", ["postgres"])
    held: dict[str, dict[str, Any]] = {}
    calls: list[tuple[Any, ...]] = []

    def remote_set(h: Path, stores: list[str], path: str, value: bytes, meta: Any, node: str | None) -> str:
        calls.append(("set", h, list(stores), path, value, meta, node))
        held[f"{path}@{node}" if node else path] = {"version": 7, "set_by": meta.set_by, "set_at": meta.set_at, "type": meta.type}
        return "7"

    def store_call(h: Path, stores: list[str], method: str, body: dict[str, Any], **kw: Any) -> list[tuple[str, Any]]:
        calls.append((method, h, list(stores), body))
        if method == "store.delete":
            return [(stores[0], {"deleted": held.pop(body["path"], None) is not None})]
        raise AssertionError(method)

    monkeypatch.setattr(cluster, "remote_set", remote_set)
    monkeypatch.setattr(cluster, "store_call", store_call)
    monkeypatch.setattr(secret_cmd, "_remote_meta", lambda h, stores: dict(held))
    monkeypatch.setattr(secret_cmd, "_status_of", lambda h, ep: {"node": f"store-{ep[-1]}", "secrets": len(held), "root": "r",
                                                                  "peers": [{"connected": True}]})
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    monkeypatch.delenv("LAB_PUPPET_MODULES", raising=False)
    capsys.readouterr()
    return home, cli, calls, held


def _lab(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], home: Path, *args: str,
         stdin: bytes = b"") -> tuple[int, str, str]:
    monkeypatch.setenv("LAB_HOME", str(home))
    monkeypatch.setattr("sys.stdin", Stdin(io.BytesIO(stdin)))
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_connected_home_prints_what_the_coordinator_host_prints(connected: Any, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    home, cli, calls, held = connected

    def both(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        a = _lab(monkeypatch, capsys, home, *args, stdin=stdin)
        b = _lab(monkeypatch, capsys, cli, *args, stdin=stdin)
        assert b == a, args
        return a

    assert both("get", "secrets")[0] == 0
    code, out, _ = _lab(monkeypatch, capsys, cli, "secret", "set", PG, stdin=b"pg-pass")
    assert (code, out) == (0, "  ✓ Updated. Accessible by: postgres (1 server)\n")
    kind, h, stores, path, value, meta, node = calls[-1]
    assert (kind, h, stores, path, value, node) == ("set", cli, STORES, PG, b"pg-pass", None)
    assert (meta.owner, meta.mode, meta.type) == ("postgres", 0o600, "static")
    for args in (("get", "secrets"), ("get", "secrets", "-o", "json"), ("show", "secret", PG), ("show", "secret", PG, "-o", "json"),
                 ("show", "secret", "tls/node-cert", "-o", "json"), ("secret", "audit"), ("secret", "audit", "-o", "json"),
                 ("secret", "status", "--store", "-o", "json"), ("show", "secret", "nope")):
        both(*args)
    assert "LAST ROTATED" in both("get", "secrets")[1] and "not read inside" not in both("get", "secrets")[2]
    assert both("secret", "rotate", PG, "--generator", "password")[1] == f"  ✓ Rotated 1 value of {PG} (password)\n"
    assert calls[-1][:4] == ("set", cli, STORES, PG)
    assert both("secret", "set", "tls/node-cert", stdin=b"v")[0] == 2  # per-machine: --node
    assert _lab(monkeypatch, capsys, cli, "secret", "rm", PG)[:2] == (0, f"  ✓ Removed {PG}\n")
    assert calls[-1] == ("store.delete", cli, STORES, {"path": PG})
    assert both("secret", "rm", PG)[0] == 3


def test_connected_home_without_stores_refuses_writes(daemon: Any, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _engine, _coordinator, cli = daemon
    monkeypatch.setattr(cluster, "store_call", lambda *a, **k: pytest.fail("no store to call"))
    for args in (("secret", "rm", PG), ("secret", "status", "--store"), ("secret", "set", PG)):
        code, _out, err = _lab(monkeypatch, capsys, cli, *args, stdin=b"v")
        assert code == 1 and "knows no secret store" in err and err.count("\n") == 1, (args, err)
    code, out, err = _lab(monkeypatch, capsys, cli, "get", "secrets")
    assert code == 0 and PG in out and err == ""


@pytest.mark.parametrize("method", sorted(METHODS) + ["secrets.nope"])
def test_secrets_methods_need_the_admin_role_first(daemon: Any, method: str) -> None:  # noqa: F811
    engine, coordinator, _ = daemon

    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the engine was used ({name}) before the role was checked")

    coordinator.engine = Untouchable()
    req = wire.Request(id=1, method=method, body={"path": PG, "stored": []})
    for roles in (("node",), ("store",), ("coordinator",), ()):
        with pytest.raises(NotEntitled, match=f"{method} needs the 'admin' role"):
            trio.run(coordinator.handle, peer_with_roles(engine.paths.home, roles), req)
    coordinator.engine = engine
    admin = peer_with_roles(engine.paths.home, ("admin",))
    if method == "secrets.nope":
        with pytest.raises(NotFound):
            trio.run(coordinator.handle, admin, req)
    else:
        out = trio.run(coordinator.handle, admin, req)
        assert set(out) == {"result", "warnings"} and out["result"]["stores"] == []


def test_secrets_definition_and_audit_bodies(daemon: Any) -> None:  # noqa: F811
    engine, coordinator, _ = daemon
    admin = peer_with_roles(engine.paths.home, ("admin",))
    engine.add_server("db-1", "ssh", ["postgres"])

    def call(method: str, body: dict[str, Any]) -> Any:
        return trio.run(coordinator.handle, admin, wire.Request(id=1, method=method, body=body))["result"]

    r = call("secrets.definition", {"path": PG})
    assert secret_from_wire(r["definition"]).owner == "postgres" and r["consumers"] == [["postgres", ["db-1"]]]
    assert call("secrets.definition", {"path": "no/such"}) == {"definition": None, "consumers": [], "stores": []}
    audit = call("secrets.audit", {"stored": [PG, "stray/one"]})
    kinds = {(f["kind"], f["path"]) for f in audit["findings"]}
    assert ("unreferenced-value", "stray/one") in kinds and ("never-set", PG) not in kinds
    for method, body in (("secrets.definition", {}), ("secrets.audit", {"stored": "x"}), ("secrets.audit", {"stored": [1]})):
        with pytest.raises(Exception, match="must be"):
            call(method, body)
