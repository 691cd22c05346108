"""The targeting engine against the spec's examples and against a brute-force reading of the rules."""

from __future__ import annotations

import dataclasses
import pathlib

from hypothesis import given, settings
from hypothesis import strategies as st

from lab.common.config import Alert, Definitions, Exclude, Group, Label, Selector, load_definitions
from lab.common.targeting import Fleet

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "common" / "config" / "examples"


@dataclasses.dataclass(frozen=True)
class S:
    name: str
    labels: tuple[str, ...] = ()
    environment: str | None = None
    region: str | None = None
    size: str | None = None


def spec_fleet() -> Fleet:
    return Fleet(
        load_definitions(EXAMPLES),
        [
            S("worker-5", ("k8s-worker", "production", "eu-west"), "prod", "eu-west"),
            S("batch-worker-1", ("k8s-worker",), "prod", "eu-west"),
            S("test-box-1", ("k8s-worker",), "dev", "eu-west"),
            S("legacy-node-3", ("k8s-worker",), "prod", "eu-west"),
            S("exp-1", ("k8s-server", "experimental"), "prod", "eu-west"),
            S("db-1", ("postgres", "production", "eu-west"), "prod", "eu-west"),
            S("db-2", ("postgres",), "prod", "eu-west"),
            S("mail-1", ("mailserver",), "prod", "us-east"),
            S("stage-1", ("app",), "staging", "eu-west"),
        ],
    )


def test_server_view_lists_everything_with_its_source() -> None:
    v = spec_fleet().server("worker-5")
    classes = {i.name: i.source for i in v.puppet_classes}
    assert classes == {
        "kubernetes::worker": "label:k8s-worker",
        "containerd": "label:k8s-worker",
        "node_exporter": "label:k8s-worker",
        "base::hardening": "label:production",
        "base::monitoring": "label:production",
        "base::ntp_eu": "label:eu-west",
    }
    alerts = {i.name: i.source for i in v.alerts}
    assert alerts["kubelet_healthy"] == "label:k8s-worker"
    assert alerts["disk_space_low"] == "group:production"
    assert alerts["high_cpu"] == "environment:prod"
    assert alerts["cpu_threshold"] == "auto:size:large"
    assert alerts["memory_threshold"] == "auto:size:large"
    assert alerts["cert_expiry"] == "auto:identity"
    assert alerts["puppet_run_failed"] == "auto:enrollment"
    assert {i.name: i.source for i in v.secrets} == {"k8s/join-token": "label:k8s-worker", "tls/node-cert": "label:k8s-worker"}
    assert set(v.groups) == {"production", "eu-west-compute", "eu-infrastructure", "all-except-staging"}
    assert v.size == "large" and v.size_source == "label:k8s-worker"


def test_exclusions_are_reported() -> None:
    f = spec_fleet()
    batch = f.server("batch-worker-1")
    assert [(e.kind, e.name, e.reason) for e in batch.excluded_from] == [("alert", "memory_pressure", "by name")]
    assert "memory_pressure" not in {a.name for a in batch.alerts}
    test_box = f.server("test-box-1")
    assert ("group", "eu-infrastructure") in {(e.kind, e.name) for e in test_box.excluded_from}
    assert "eu-west-compute" in test_box.groups and "eu-infrastructure" not in test_box.groups
    exp = f.server("exp-1")
    assert "eu-infrastructure" not in exp.groups
    assert any(e.name == "eu-infrastructure" and "experimental" in e.reason for e in exp.excluded_from)
    legacy = f.server("legacy-node-3")
    assert "eu-west-compute" not in legacy.groups and "eu-infrastructure" not in legacy.groups


def test_port_and_class_alerts() -> None:
    f = spec_fleet()
    mail = {i.name: i.source for i in f.server("mail-1").alerts}
    assert mail["smtp_check"] == "auto:port:25"
    assert mail["imap_check"] == "auto:port:993"
    assert mail["mail_queue_critical"] == "label:mailserver"
    db = {i.name: i.source for i in f.server("db-1").alerts}
    assert db["postgres_replication_lag"] == "label:postgres"  # the label names it first
    assert "auto:class:postgresql::server" in next(i for i in f.server("db-1").alerts if i.name == "postgres_replication_lag").sources
    assert db["postgres_process"] == "auto:class:postgresql::server"
    assert db["storage_iops"] == "group:eu-west-storage"


def test_label_items_are_what_labels_and_size_give_any_server() -> None:
    f = spec_fleet()
    items = f.label_items(("mailserver", "eu-west", "undefined-label"), None)
    assert [(i.name, i.sources) for i in items.puppet_classes] == [
        ("postfix", ("label:mailserver",)),
        ("dovecot", ("label:mailserver",)),
        ("spamassassin", ("label:mailserver",)),
        ("fail2ban", ("label:mailserver",)),
        ("base::ntp_eu", ("label:eu-west",)),
    ]
    assert [(i.name, i.detail) for i in items.secrets] == [
        ("mail/tls-cert", "dynamic"), ("mail/dkim-key", "static"), ("mail/relay-credentials", "static"),
    ]
    assert items.label_alerts == (
        ("smtp_connect", "label:mailserver"), ("imap_connect", "label:mailserver"), ("mail_queue_length", "label:mailserver"),
    )
    assert items.auto_alerts == (
        ("cpu_threshold", "auto:size:medium"), ("memory_threshold", "auto:size:medium"),
        ("smtp_check", "auto:port:25"), ("smtp_check", "auto:port:587"), ("imap_check", "auto:port:993"),
        ("postfix_process", "auto:class:postfix"), ("dovecot_process", "auto:class:dovecot"),
        ("cert_expiry", "auto:identity"), ("puppet_run_failed", "auto:enrollment"), ("agent_checkin_missed", "auto:enrollment"),
    )
    assert items.ports == (25, 587, 993)
    assert (items.size, items.size_source) == ("medium", "label:mailserver")
    recorded = f.label_items(("k8s-worker", "k8s-server"), "small")
    assert (recorded.size, recorded.size_source) == ("small", "server")
    assert [i.name for i in recorded.puppet_classes].count("containerd") == 1
    assert next(i for i in recorded.puppet_classes if i.name == "containerd").sources == ("label:k8s-worker", "label:k8s-server")
    assert next(i for i in recorded.secrets if i.name == "tls/node-cert").detail == "dynamic, per-machine"
    bare = f.label_items((), None)
    assert bare.puppet_classes == bare.secrets == bare.label_alerts == () and bare.ports == ()
    assert bare.size is None and bare.size_source is None
    assert [a for a, _src in bare.auto_alerts] == ["cert_expiry", "puppet_run_failed", "agent_checkin_missed"]


def test_a_server_view_is_its_label_items_plus_the_alerts_that_target_it() -> None:
    f = spec_fleet()
    for name, s in f.servers.items():
        view, items = f.server(name), f.label_items(s.labels, s.size)
        assert (view.puppet_classes, view.secrets, view.ports) == (items.puppet_classes, items.secrets, items.ports)
        assert (view.size, view.size_source) == (items.size, items.size_source)
        pairs = {(i.name, src) for i in view.alerts for src in i.sources}
        from_labels = set(items.label_alerts) | set(items.auto_alerts)
        targeted = {a for a in f.definitions.alerts if name in f.alert_servers(a)[0]}
        assert from_labels <= pairs
        assert {(a, src) for a, src in pairs if a not in targeted} == {(a, src) for a, src in from_labels if a not in targeted}
        assert {a for a, _src in pairs} == {a for a, _src in from_labels} | targeted


def test_reverse_queries() -> None:
    f = spec_fleet()
    assert f.label_servers("k8s-worker") == ["batch-worker-1", "legacy-node-3", "test-box-1", "worker-5"]
    g = f.group("eu-infrastructure")
    assert g.members == ("batch-worker-1", "db-1", "db-2", "stage-1", "worker-5")
    assert dict(g.excluded) == {"test-box-1": "by name", "exp-1": 'label "experimental" (explicitly excluded)'}
    assert dict(g.subgroups)["eu-west-compute"] == 4
    assert g.alerts == ("network_latency_high",)
    assert f.group_members("database-tier") == ["db-1", "db-2"]  # explicit db-1 + replica-set-eu's db-2
    assert f.group("database-tier").missing_servers == ("db-3",)
    assert f.group_members("all-except-staging") == sorted(
        ["worker-5", "batch-worker-1", "test-box-1", "legacy-node-3", "exp-1", "db-1", "db-2", "mail-1"]
    )
    servers, excluded = f.alert_servers("memory_pressure")
    assert "batch-worker-1" not in servers and excluded == [("batch-worker-1", "by name")]
    assert f.secret_consumers("k8s/join-token") == [
        ("k8s-worker", ["batch-worker-1", "legacy-node-3", "test-box-1", "worker-5"]),
        ("k8s-server", ["exp-1"]),
    ]


def test_selector_combinations_for_queries() -> None:
    f = spec_fleet()
    sel = Selector(labels=frozenset({"k8s-worker"}), environments=frozenset({"prod"}))
    assert f.select(sel, Exclude(servers=frozenset({"legacy-node-3"}))) == ["batch-worker-1", "worker-5"]
    assert f.select(Selector(groups=frozenset({"production"})), Exclude(attributes=Selector(labels=frozenset({"postgres"})))) == [
        "batch-worker-1",
        "exp-1",
        "legacy-node-3",
        "mail-1",
        "worker-5",
    ]
    assert f.select(Selector()) == sorted(f.servers)


def test_relabel_moves_a_server_between_sets() -> None:
    f = spec_fleet()
    f.compile()
    assert "mail-1" not in f.group_members("eu-west-compute")
    v = f.relabel("mail-1", S("mail-1", ("k8s-worker",), "prod", "eu-west"))
    assert "eu-west-compute" in v.groups
    assert "mail-1" in f.group_members("eu-west-compute")
    assert "mail-1" in f.label_servers("k8s-worker") and "mail-1" not in f.label_servers("mailserver")
    assert "mail-1" in f.alert_servers("memory_pressure")[0]
    f2 = spec_fleet()
    f2.relabel("mail-1", S("mail-1", ("k8s-worker",), "prod", "eu-west"))
    f2.compile()
    assert f2.server("mail-1") == v


# -- brute force ----------------------------------------------------------------------------

LABELS = ["l0", "l1", "l2", "l3"]
ENVS = ["prod", "dev", "staging"]
REGIONS = ["eu", "us"]
NAMES = [f"s{i}" for i in range(8)]


def subset(items: list[str], min_size: int = 0):
    if not items:
        return st.just(frozenset())
    return st.frozensets(st.sampled_from(items), min_size=min_size, max_size=len(items))


@st.composite
def selectors(draw, groups: list[str], with_groups: bool, with_servers: bool):
    keys = draw(st.sets(st.sampled_from(["labels", "environments", "regions"] + (["groups"] if with_groups and groups else []) + (["servers"] if with_servers else [])), min_size=1))
    pools = {"labels": LABELS, "environments": ENVS, "regions": REGIONS, "groups": groups, "servers": NAMES}
    return Selector(**{k: draw(subset(pools[k], 1)) for k in keys})


@st.composite
def excludes(draw, groups: list[str]):
    if not draw(st.booleans()):
        return None
    ex = Exclude(
        servers=draw(subset(NAMES)),
        groups=draw(subset(groups)) if groups else frozenset(),  # noqa: E501
        attributes=draw(st.none() | selectors([], False, False)),
    )
    if not ex.servers and not ex.groups and ex.attributes is None:
        return None
    return ex


@st.composite
def worlds(draw):
    n_groups = draw(st.integers(1, 7))
    groups: dict[str, Group] = {}
    # Group i may only nest or exclude groups with a higher index: a DAG, several levels deep.
    for i in reversed(range(n_groups)):
        later = [f"g{j}" for j in range(i + 1, n_groups)]
        match = draw(st.none() | selectors([], False, False))
        subs = tuple(sorted(draw(subset(later))))
        servers = tuple(sorted(draw(subset(NAMES))))
        if match is None and not subs and not servers:
            servers = (NAMES[0],)
        groups[f"g{i}"] = Group(f"g{i}", match, subs, servers, draw(excludes(later)))
    all_groups = list(groups)
    alerts = {}
    for i in range(draw(st.integers(0, 4))):
        alerts[f"a{i}"] = Alert(f"a{i}", draw(selectors(all_groups, True, True)), "x > 1", exclude=draw(excludes(all_groups)))
    defs = Definitions(None, {x: Label(x) for x in LABELS}, groups, alerts, {}, {})
    servers = [
        S(name, tuple(sorted(draw(subset(LABELS)))), draw(st.sampled_from(ENVS)), draw(st.sampled_from(REGIONS)))
        for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    ]
    return defs, servers


def brute_selects(sel: Selector, s: S, member) -> bool:
    checks = []
    if sel.labels:
        checks.append(any(x in s.labels for x in sel.labels))
    if sel.environments:
        checks.append(s.environment in sel.environments)
    if sel.regions:
        checks.append(s.region in sel.regions)
    if sel.servers:
        checks.append(s.name in sel.servers)
    if sel.groups:
        checks.append(any(member(g, s) for g in sel.groups))
    return bool(checks) and all(checks)


def brute_excludes(ex: Exclude | None, s: S, member) -> bool:
    if ex is None:
        return False
    return (
        s.name in ex.servers
        or any(member(g, s) for g in ex.groups)
        or (ex.attributes is not None and brute_selects(ex.attributes, s, member))
    )


def brute_member(defs: Definitions):
    def member(name: str, s: S) -> bool:
        g = defs.groups[name]
        candidate = (
            (g.match is not None and brute_selects(g.match, s, member))
            or s.name in g.servers
            or any(member(sub, s) for sub in g.groups)
        )
        return candidate and not brute_excludes(g.exclude, s, member)

    return member


@settings(max_examples=300)
@given(worlds())
def test_engine_equals_brute_force(world) -> None:
    defs, servers = world
    member = brute_member(defs)
    fleet = Fleet(defs, servers)
    for g in defs.groups:
        assert fleet.group_members(g) == sorted(s.name for s in servers if member(g, s)), g
    for a, alert in defs.alerts.items():
        expected = sorted(
            s.name for s in servers if brute_selects(alert.target, s, member) and not brute_excludes(alert.exclude, s, member)
        )
        assert fleet.alert_servers(a)[0] == expected, a
    # One server evaluated alone agrees with the whole-fleet sets, and so does the compiled view.
    alone = {s.name: fleet.server(s.name) for s in servers}
    fleet.compile()
    for s in servers:
        assert fleet.server(s.name) == alone[s.name]


@settings(max_examples=150)
@given(worlds(), st.data())
def test_relabel_equals_recompute(world, data) -> None:
    defs, servers = world
    if not servers:
        return
    fleet = Fleet(defs, servers)
    fleet.compile()
    target = data.draw(st.sampled_from(servers))
    new = S(target.name, tuple(sorted(data.draw(subset(LABELS)))), data.draw(st.sampled_from(ENVS)), data.draw(st.sampled_from(REGIONS)))
    fleet.relabel(target.name, new)
    fresh = Fleet(defs, [new if s.name == target.name else s for s in servers])
    fresh.compile()
    for g in defs.groups:
        assert fleet.group_members(g) == fresh.group_members(g)
        assert fleet.group(g) == fresh.group(g)
    for a in defs.alerts:
        assert fleet.alert_servers(a) == fresh.alert_servers(a)
    for s in servers:
        assert fleet.server(s.name) == fresh.server(s.name)
