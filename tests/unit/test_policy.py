"""Policy compilation: labels' secrets, lab::secret calls in Puppet manifests, per-machine secrets."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from lab.common.config import load_texts
from lab.common.identity import CertificateAuthority
from lab.coordinator.policy import audit, class_manifest, compile_policy, scan_classes, scan_text
from lab.store.policy import PolicyDocument

MODULES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "puppet" / "modules"

DEFS = """
labels:
  mailserver:
    puppet_classes: [postfix]
    secrets: [mail/tls-cert]
  k8s-worker:
    puppet_classes: [kubernetes::worker, missing::klass]
  app:
    puppet_classes: [app::database, app::deploy]
    secrets: [monitoring/api-key]
  dyn:
    puppet_classes: [dyn]
  web:
    puppet_classes: [web]
  secret-store: {}
  unused:
    puppet_classes: [app::database]
secrets:
  mail/tls-cert: {type: static}
  mail/relay-credentials: {type: static}
  tls/node-cert: {type: dynamic, generator: ca, per_machine: true}
  old/api-key: {type: static}
  monitoring/api-key: {type: static}
"""


@dataclasses.dataclass(frozen=True)
class S:
    name: str
    labels: tuple[str, ...]
    environment: str | None = None
    region: str | None = None
    size: str | None = None


SERVERS = [S("mail-1", ("mailserver",)), S("worker-1", ("k8s-worker",)), S("app-1", ("app", "secret-store")), S("bare", ()),
           S("web-1", ("web",))]


@pytest.fixture(scope="module")
def compiled():
    return compile_policy(load_texts([("defs.yaml", DEFS)]), SERVERS, MODULES)


def test_postfix_manifest_edge_cases() -> None:
    refs = scan_text((MODULES / "postfix/manifests/init.pp").read_text(), "postfix/init.pp")
    found = {r.path: r.line for r in refs}
    assert found == {
        "mail/relay-credentials": 4,   # single quotes
        "mail/dkim-key": 9,            # double quotes, trailing # comment with a call ignored
        "mail/tls-cert": 11,           # multi-line call, trailing comma: line of the call
        "mail/after-escape": 17,       # after a string with an escaped quote; leading ::
    }
    assert all(r.problem is None for r in refs)  # comments and strings hold no calls


def test_unresolvable_references_are_reported_not_granted() -> None:
    refs = scan_text((MODULES / "dyn/manifests/init.pp").read_text(), "dyn/init.pp")
    assert [(r.path, r.line) for r in refs if r.path] == [("ok/static", 5)]
    problems = {r.line: r.problem for r in refs if r.path is None}
    assert set(problems) == {2, 3, 4, 7}
    assert "interpolation" in problems[3] and "not a string literal" in problems[2] and "expression" in problems[7]


def test_spacing_and_hash_in_double_quoted_string() -> None:
    refs = scan_text((MODULES / "app/manifests/deploy.pp").read_text(), "deploy.pp")
    assert [(r.path, r.line) for r in refs] == [("app/deploy-token", 2)]


def test_unterminated_comment_and_string_do_not_crash() -> None:
    assert scan_text("/* lab::secret('a')", "f") == []
    assert scan_text("$x = 'lab::secret(\"a\")", "f") == []
    assert [r.path for r in scan_text("lab::secret('a') # x\nlab::secret('b')", "f")] == ["a", "b"]


def test_class_to_manifest_path() -> None:
    m = pathlib.Path("/m")
    assert class_manifest(m, "postfix") == m / "postfix/manifests/init.pp"
    assert class_manifest(m, "kubernetes::worker") == m / "kubernetes/manifests/worker.pp"
    assert class_manifest(m, "a::b::c") == m / "a/manifests/b/c.pp"
    assert class_manifest(m, "::postfix") == m / "postfix/manifests/init.pp"
    assert class_manifest(m, "../etc") is None


def test_entitlements_come_from_labels_and_manifests_with_sources(compiled) -> None:
    assert compiled.paths_of("mail-1") == ["mail/after-escape", "mail/dkim-key", "mail/relay-credentials", "mail/tls-cert"]
    src = compiled.grants["mail-1"]["mail/relay-credentials"]
    assert src == ["label:mailserver → class:postfix → modules/postfix/manifests/init.pp:4"]
    # a path granted both ways keeps both sources
    assert compiled.grants["mail-1"]["mail/tls-cert"][0] == "label:mailserver"
    assert len(compiled.grants["mail-1"]["mail/tls-cert"]) == 2
    assert compiled.paths_of("worker-1") == ["k8s/join-token", "tls/node-cert"]  # not 'wrong/place'
    assert compiled.paths_of("app-1") == ["app/deploy-token", "db/password", "monitoring/api-key"]
    assert compiled.paths_of("bare") == []
    assert compiled.stores == ["app-1"] and compiled.per_machine == {"tls/node-cert"}
    assert any("missing::klass" in w for w in compiled.warnings)


def test_removing_a_class_from_a_label_removes_its_grants() -> None:
    d = load_texts([("defs.yaml", DEFS.replace("puppet_classes: [postfix]", "puppet_classes: []"))])
    c = compile_policy(d, SERVERS, MODULES)
    assert c.paths_of("mail-1") == ["mail/tls-cert"]


def test_signed_document_round_trip(compiled) -> None:
    ca = CertificateAuthority.generate()
    doc = compiled.document(ca, version=3, now=100)
    back = PolicyDocument.decode_untrusted(doc.encode())
    back.verify(ca.public_key)
    assert back.grants["mail-1"] == tuple(compiled.paths_of("mail-1")) and back.version == 3


def test_audit_reports_orphaned_never_set_and_undefined(compiled) -> None:
    d = load_texts([("defs.yaml", DEFS)])
    findings = audit(d, compiled, {"mail/tls-cert": True, "tls/node-cert@worker-1": True, "stray/x": True})
    by = {(f.kind, f.path) for f in findings}
    assert ("orphaned", "old/api-key") in by
    assert ("never-set", "db/password") in by and ("undefined", "db/password") in by
    assert ("never-set", "mail/tls-cert") not in by and ("never-set", "tls/node-cert") not in by
    assert ("unreferenced-value", "stray/x") in by
    msg = next(f.message for f in findings if f.kind == "never-set" and f.path == "db/password")
    assert msg.startswith('Secret "db/password" referenced by class "app::database"') and msg.endswith("never set — empty!")


def test_declared_classes_are_found_in_every_form() -> None:
    refs = scan_classes((MODULES / "web/manifests/init.pp").read_text(), "web/init.pp")
    assert [(r.name, r.line) for r in refs] == [("web::tls", 4), ("web::vhost", 4), ("web::vhost", 6), ("web::cache", 9)]
    assert scan_classes("class foo { }\nfile { 'x': require => Class['bar'] }", "f") == []
    assert [r.name for r in scan_classes("include foo, 'bar::baz'\nrequire ::qux", "f")] == ["foo", "bar::baz", "qux"]


def test_included_classes_grant_their_secrets_with_the_chain_as_source(compiled) -> None:
    assert compiled.paths_of("web-1") == ["web/cache-pass", "web/tls-key", "web/vhost-token"]
    src = compiled.grants["web-1"]["web/tls-key"]
    assert src == ["label:web → class:web → class:web::tls (modules/web/manifests/init.pp:4) → modules/web/manifests/tls.pp:2"]
    assert {r.path for r in compiled.class_refs["web"]} == {"web/cache-pass", "web/tls-key", "web/vhost-token"}
