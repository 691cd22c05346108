"""`lab dash` without a terminal: what each screen shows for a fleet, the navigation state machine,
the data worker, and the urwid widget tree rendered to canvases off-screen."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import pytest

from lab.coordinator.engine import Engine, Paths
from lab.coordinator.tui import models, nav, source
from lab.coordinator.tui.models import Target

FLEET = (
    ("worker-5", "aws", "k8s-worker,production,eu-west", "prod", "eu-west", None),
    ("batch-worker-1", "aws", "k8s-worker", "prod", "eu-west", None),
    ("test-box-1", "ssh", "k8s-worker", "dev", "eu-west", None),
    ("db-1", "baremetal", "postgres,production,eu-west", "prod", "eu-west", None),
    ("mail-1", "xcpng", "mailserver", "prod", "us-east", "small"),
)


@pytest.fixture()
def engine(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    paths = Paths.resolve()
    Engine.init_local(paths)
    with Engine.open(paths) as e:
        for name, provider, labels, env, region, size in FLEET:
            e.add_server(name, provider, labels.split(","), env, region, size)
        yield e


def names(rows) -> list[str]:
    return [r.key for r in rows]


# -- list screens ------------------------------------------------------------------------------


def test_servers_table_rows_pillars_and_links(engine: Engine) -> None:
    t = source.load(engine, ("list", "servers"))
    assert isinstance(t, models.Table) and t.view == "servers"
    assert names(t.rows) == sorted(n for n, *_ in FLEET)
    w5 = next(r for r in t.rows if r.key == "worker-5")
    assert w5.target == Target("server", "worker-5")
    texts = [c.text for c in w5.cells]
    assert texts[:5] == ["worker-5", "aws", "prod", "k8s-worker,production,eu-west", "large"]
    sync, puppet, health, identity = w5.cells[5:]
    assert (sync.text, sync.style, sync.short) == ("? unknown", "unknown", "?")
    assert (identity.text, identity.style) == ("– not enrolled", "off")
    assert [c.title for c in t.columns][-4:] == ["SYNC", "PUPPET", "HEALTH", "IDENTITY"]


def test_pillar_colours_follow_the_value() -> None:
    values = ("sync", "drift", "failed", "unknown", "not enrolled", "enrolled", "weird", "ok", "2 alerts", "unknown (source down)")
    assert [models.pillar_state(v) for v in values] == ["ok", "warn", "fail", "unknown", "off", "ok", "warn", "ok", "warn", "unknown"]
    t = models.servers_table([{"name": "a", "labels": [], "sync": "drift", "puppet": "failed", "health": "ok", "identity": "enrolled"}], models.ASCII_SYMBOLS)
    assert [(c.short, c.style) for c in t.rows[0].cells[5:]] == [("!", "warn"), ("x", "fail"), ("+", "ok"), ("+", "ok")]


def test_other_list_screens(engine: Engine) -> None:
    labels = source.load(engine, ("list", "labels"))
    k8s = next(r for r in labels.rows if r.key == "k8s-worker")
    assert k8s.target == Target("label", "k8s-worker") and k8s.cells[1].text == "3"
    assert "kubernetes::worker" in k8s.cells[2].text
    groups = source.load(engine, ("list", "groups"))
    eu = next(r for r in groups.rows if r.key == "eu-infrastructure")
    assert eu.cells[1].text == "3" and eu.cells[2].text == "1"  # test-box-1 excluded
    alerts = source.load(engine, ("list", "alerts"))
    mp = next(r for r in alerts.rows if r.key == "memory_pressure")
    assert mp.cells[1].style == "warn" and "excluding batch-worker-1 (by name)" in mp.cells[3].text
    secrets = source.load(engine, ("list", "secrets"))
    jt = next(r for r in secrets.rows if r.key == "k8s/join-token")
    assert jt.target == Target("secret", "k8s/join-token") and "k8s-worker (3)" in jt.cells[3].text
    assert all(len(r.cells) == len(secrets.columns) for r in secrets.rows)


@pytest.mark.parametrize("view", models.VIEWS)
def test_every_layout_fits_every_width(engine: Engine, view: str) -> None:
    t = source.load(engine, ("list", view))
    for width in range(8, 260, 7):
        widths = models.layout(t.columns, t.natural, width)
        shown = [w for w in widths if w]
        assert shown and sum(shown) + len(shown) - 1 <= width
        for row in t.rows:
            line = " ".join(models.cell_text(c, w) for c, w in zip(row.cells, widths) if w)
            assert models.cells(line) <= width


def test_pillars_are_symbols_at_80_and_words_when_wide(engine: Engine) -> None:
    t = source.load(engine, ("list", "servers"))
    narrow = models.layout(t.columns, t.natural, 80)
    wide = models.layout(t.columns, t.natural, 200)
    assert narrow[5:] == [1, 1, 1, 1]  # the four pillars shrink together
    assert [models.title_text(c, w).strip() for c, w in zip(t.columns[5:], narrow[5:])] == ["S", "P", "H", "I"]
    assert all(w >= len("? unknown") for w in wide[5:8])
    assert models.cell_text(t.rows[0].cells[5], 1) == "?"


def test_clip_and_wide_characters() -> None:
    assert models.clip("abcdef", 4) == "abc…"
    assert models.clip("ab", 4) == "ab  "
    assert models.cells(models.clip("日本語テキスト", 5)) == 5


def test_filter_terms_and_negation(engine: Engine) -> None:
    t = source.load(engine, ("list", "servers"))
    assert names(models.filter_rows(t.rows, "worker")) == ["batch-worker-1", "test-box-1", "worker-5"]  # labels count
    assert names(models.filter_rows(t.rows, "worker-5")) == ["worker-5"]
    assert names(models.filter_rows(t.rows, "k8s-worker !batch")) == ["test-box-1", "worker-5"]
    assert names(models.filter_rows(t.rows, "PROD baremetal")) == ["db-1"]
    assert models.filter_rows(t.rows, "  ") == t.rows
    assert models.filter_rows(t.rows, "nothing-like-this") == ()


# -- detail screens -----------------------------------------------------------------------------


def test_server_detail_shows_everything_with_sources(engine: Engine) -> None:
    d = source.load(engine, ("detail", "server", "worker-5"))
    assert isinstance(d, models.Detail) and d.title == "Server: worker-5"
    facts = {f.name: f.value for f in d.facts}
    assert facts["Provider"] == "aws" and facts["Env"] == "prod" and facts["Size"].startswith("large")
    assert facts["Sync"] == "? unknown" and facts["Identity"] == "– not enrolled"
    labels = d.section("Labels")
    assert [(ln.text, ln.target) for ln in labels.lines] == [(x, Target("label", x)) for x in ("k8s-worker", "production", "eu-west")]
    assert {ln.text for ln in d.section("Groups").lines} >= {"production", "eu-west-compute", "eu-infrastructure"}
    puppet = {ln.text: ln for ln in d.section("Puppet Classes").lines}
    assert puppet["kubernetes::worker"].note == "from label k8s-worker"
    assert puppet["kubernetes::worker"].target == Target("label", "k8s-worker")  # a class leads to the label giving it
    assert puppet["base::ntp_eu"].target == Target("label", "eu-west")
    secrets = {ln.text: ln for ln in d.section("Secrets").lines}
    assert set(secrets) == {"k8s/join-token", "tls/node-cert"}
    assert secrets["k8s/join-token"].target == Target("secret", "k8s/join-token")
    assert "from label k8s-worker" in secrets["k8s/join-token"].note
    alerts = {ln.text: ln for ln in d.section("Alerts").lines}
    assert alerts["disk_space_low"].note == "warning from group production" and alerts["disk_space_low"].style == "warn"
    assert alerts["cert_expiry"].note == "auto: identity"
    assert [s.key for s in d.sections] == ["l", "g", "s", "h", "a", "p"]
    health = d.section("Health")
    assert health.title == "Health (0 firing)" and "no health sources configured" in health.lines[0].text


def test_server_detail_shows_exclusions(engine: Engine) -> None:
    d = source.load(engine, ("detail", "server", "batch-worker-1"))
    ex = d.section("Excluded From")
    assert [(ln.text, ln.target, ln.note) for ln in ex.lines] == [("alert memory_pressure", Target("alert", "memory_pressure"), "by name")]


def test_label_detail_servers_and_what_it_provides(engine: Engine) -> None:
    d = source.load(engine, ("detail", "label", "k8s-worker"))
    servers = d.section("Servers")
    assert [ln.target.name for ln in servers.lines] == ["batch-worker-1", "test-box-1", "worker-5"]
    assert servers.lines[0].text == "batch-worker-1 (aws, prod)" and servers.lines[0].note == "? ? ? –"
    assert [ln.text for ln in d.section("Puppet Classes").lines] == ["kubernetes::worker", "containerd", "node_exporter"]
    assert all(ln.target is None for ln in d.section("Puppet Classes").lines)
    assert [ln.target for ln in d.section("Secrets").lines] == [Target("secret", "k8s/join-token"), Target("secret", "tls/node-cert")]
    assert [ln.text for ln in d.section("Alerts").lines] == ["kubelet_healthy", "node_ready"]
    assert {f.name: f.value for f in d.facts}["Applied to"] == "3 servers"


def test_group_detail_subgroup_tree_members_exclusions(engine: Engine) -> None:
    d = source.load(engine, ("detail", "group", "eu-infrastructure"))
    tree = d.section("Subgroups").lines
    assert [(ln.text, ln.depth) for ln in tree] == [("eu-west-compute", 0), ("eu-west-storage", 0), ("eu-west-network", 0)]
    assert tree[0].note == "3 servers" and tree[0].target == Target("group", "eu-west-compute")
    assert [ln.target.name for ln in d.section("Members").lines] == ["batch-worker-1", "db-1", "worker-5"]
    excluded = d.section("Excluded").lines
    assert ("test-box-1", Target("server", "test-box-1"), "by name") in [(ln.text, ln.target, ln.note) for ln in excluded]
    assert [ln.text for ln in d.section("Alerts").lines] == ["network_latency_high"]
    nested = source.load(engine, ("detail", "group", "database-tier"))
    assert [(ln.text, ln.depth) for ln in nested.section("Subgroups").lines] == [("replica-set-eu", 0)]
    listed = nested.section("Listed By Name").lines
    assert [(ln.text, ln.target, ln.note) for ln in listed] == [
        ("db-1", Target("server", "db-1"), "listed by name"),
        ("db-2", None, "not in the inventory"),
        ("db-3", None, "not in the inventory"),
    ]


def test_subgroup_tree_nests_and_never_loops() -> None:
    subs = {"a": ["b", "c"], "b": ["d"], "d": ["a"]}
    lines = models.subgroup_tree("a", subs, {"b": 1, "c": 2, "d": 0})
    assert [(ln.text, ln.depth) for ln in lines] == [("b", 0), ("d", 1), ("c", 0)]


def test_alert_detail_servers_it_applies_to(engine: Engine) -> None:
    d = source.load(engine, ("detail", "alert", "memory_pressure"))
    assert [ln.target.name for ln in d.section("Servers").lines] == ["test-box-1", "worker-5"]
    assert [(ln.text, ln.note) for ln in d.section("Excluded").lines] == [("batch-worker-1", "by name")]
    facts = {f.name: f.value for f in d.facts}
    assert facts["Severity"] == "warning" and facts["Applies to"] == "2 servers"
    auto = source.load(engine, ("detail", "alert", "cert_expiry"))
    assert len(auto.section("Servers").lines) == len(FLEET)


def test_server_detail_with_health_from_the_sources() -> None:
    view = {
        "name": "db-1", "provider": "baremetal", "labels": [], "groups": [], "puppet_classes": [], "alerts": [], "secrets": [],
        "health": {"status": "1 alert", "alerts": ["disk_space_low"], "sources": [
            {"source": "prometheus", "status": "alerts", "alerts": ["disk_space_low"], "detail": ""},
            {"source": "naemon", "status": "unknown", "alerts": [], "detail": "source down: timed out"},
        ]},
    }
    d = models.server_detail(view, {"sync": "unknown", "health": "unknown"})
    assert {f.name: (f.value, f.style) for f in d.facts}["Health"] == ("⚠ 1 alert", "warn")
    lines = d.section("Health").lines
    assert [(ln.text, ln.target, ln.style) for ln in lines] == [
        ("disk_space_low", Target("alert", "disk_space_low"), "fail"),
        ("prometheus: alerts", None, "warn"),
        ("naemon: unknown", None, "unknown"),
    ]
    assert lines[2].note == "source down: timed out"


def test_alert_detail_with_current_values() -> None:
    view = {
        "name": "disk_space_low", "kind": "defined", "severity": "warning", "condition": "disk_usage_percent > 85",
        "target": 'group "production"', "excludes": [], "labels": [], "excluded": [],
        "servers": [
            {"name": "api-1", "provider": "aws", "source": "target", "current": 42.0, "status": "ok"},
            {"name": "db-1", "provider": "baremetal", "source": "target", "current": 91.5, "status": "firing"},
            {"name": "new-1", "provider": "aws", "source": "target", "current": None, "status": "unknown (source down)"},
        ],
        "rendered_to": {"prometheus": ["rules/prod.yaml"], "naemon_hosts": ["db-1"], "conditions": ["disk_usage_percent > 85"]},
    }
    d = models.alert_detail(view)
    assert [(ln.text, ln.note) for ln in d.section("Servers").lines] == [
        ("api-1 (aws)", "currently: 42  ✓ ok"),
        ("db-1 (baremetal)", "currently: 91.5  ✗ firing"),
        ("new-1 (aws)", "currently: —  ? unknown (source down)"),
    ]
    assert [ln.text for ln in d.section("Rendered To").lines] == ["Prometheus: rules/prod.yaml", "Naemon: service check on 1 host", "disk_usage_percent > 85"]


def test_secret_detail_metadata_only(engine: Engine) -> None:
    d = source.load(engine, ("detail", "secret", "k8s/join-token"))
    granted = d.section("Granted By Labels").lines
    assert [(ln.target, ln.note) for ln in granted] == [(Target("label", "k8s-worker"), "3 servers"), (Target("label", "k8s-server"), "0 servers")]
    assert [ln.target.name for ln in d.section("Servers").lines] == ["batch-worker-1", "test-box-1", "worker-5"]
    shown = " ".join(f"{f.name} {f.value}" for f in d.facts) + " ".join(ln.text + ln.note for s in d.sections for ln in s.lines)
    assert "value" not in shown.lower()


def test_detail_filter_keeps_sections(engine: Engine) -> None:
    d = source.load(engine, ("detail", "server", "worker-5"))
    f = models.filter_detail(d, "k8s")
    assert [len(s.lines) for s in f.sections] and all(s.title for s in f.sections)
    assert [ln.text for ln in f.section("Labels").lines] == ["k8s-worker"]
    assert f.section("Groups").lines == () and f.section("Groups").empty == "no match"


def test_unknown_things_raise_one_line_errors(engine: Engine) -> None:
    for key in (("detail", "server", "nope"), ("detail", "label", "nope"), ("detail", "group", "nope"), ("detail", "secret", "nope")):
        with pytest.raises(Exception) as info:
            source.load(engine, key)
        assert "nope" in source.describe_error(info.value) and "\n" not in source.describe_error(info.value)


# -- navigation ----------------------------------------------------------------------------------


def test_navigation_drill_back_filter_jump() -> None:
    n = nav.Navigator()
    assert n.current == nav.Screen("servers") and n.current.key == ("list", "servers")
    n.set_filter(" web ")
    assert n.current.filter == "web"
    n.remember(focus="web-3")
    n.drill(Target("server", "web-3"))
    assert n.current.key == ("detail", "server", "web-3") and n.current.view == "servers"
    n.drill(Target("label", "app"))
    n.drill(Target("server", "web-8"))
    assert n.breadcrumbs() == "Servers > web-3 > app > web-8"
    n.drill(Target("server", "web-8"))  # same thing again: no new step
    assert len(n.history) == 3
    assert n.back() and n.current.target == Target("label", "app")
    assert n.back() and n.back()
    assert n.current.is_list and n.current.filter == "web" and n.current.focus == "web-3"  # restored
    assert n.back() and n.current.filter == ""  # Esc clears the filter first
    assert not n.back()  # bottom of the stack
    n.jump("labels")
    assert n.current == nav.Screen("labels") and n.breadcrumbs() == "Labels"
    n.set_filter("x")
    n.jump("labels")  # jumping to the view shown clears its filter, adds no step
    assert n.current.filter == "" and len(n.history) == 1
    assert n.back() and n.current.view == "servers"
    with pytest.raises(ValueError):
        n.jump("nope")
    with pytest.raises(ValueError):
        n.drill(Target("puppet", "nginx"))


def test_history_is_bounded_and_breadcrumbs_shorten() -> None:
    n = nav.Navigator()
    for i in range(nav.HISTORY_LIMIT + 20):
        n.drill(Target("server", f"s{i}"))
    assert len(n.history) == nav.HISTORY_LIMIT
    assert n.breadcrumbs().startswith("s") and "…" in n.breadcrumbs()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":servers", nav.Command("view", "servers")),
        ("labels", nav.Command("view", "labels")),
        ("lb", nav.Command("view", "labels")),
        ("gr", nav.Command("view", "groups")),
        ("al", nav.Command("view", "alerts")),
        ("sec", nav.Command("view", "secrets")),
        ("server worker-5", nav.Command("target", "servers", Target("server", "worker-5"))),
        ("label k8s-worker", nav.Command("target", "labels", Target("label", "k8s-worker"))),
        ("q", nav.Command("quit")),
        ("quit", nav.Command("quit")),
        ("sync", nav.Command("action", "sync")),
        ("help", nav.Command("help")),
    ],
)
def test_commands(text: str, expected: nav.Command) -> None:
    assert nav.parse_command(text) == expected


def test_bad_commands_say_why() -> None:
    assert nav.parse_command("pods").kind == "error" and "unknown view" in nav.parse_command("pods").message
    assert nav.parse_command("").kind == "error"
    assert nav.parse_command("server a b").kind == "error"


# -- actions and the worker ------------------------------------------------------------------------


class NoLifecycle:
    pass


class WithLifecycle:
    def sync(self, name: str):
        yield f"syncing {name}"
        yield "converged"

    def plan(self, name: str) -> dict:
        return {"changes": 0}


def test_actions_missing_from_the_engine_say_so() -> None:
    lines: list[str] = []
    for action in ("sync", "plan", "apply", "renew"):
        source.run_action(NoLifecycle(), action, Target("server", "a"), lines.append)
    assert lines == [
        "not available from the dashboard: sync (use the lab command line)",
        "not available from the dashboard: plan (use the lab command line)",
        "not available from the dashboard: apply (use the lab command line)",
        "not available from the dashboard: identity renew (use the lab command line)",
    ]


def test_actions_present_stream_their_output() -> None:
    lines: list[str] = []
    source.run_action(WithLifecycle(), "sync", Target("server", "a"), lines.append)
    assert lines == ["sync a: started", "syncing a", "converged", "sync a: done"]
    lines.clear()
    source.run_action(WithLifecycle(), "plan", Target("server", "a"), lines.append)
    assert lines == ["plan a: started", "plan a: {'changes': 0}", "plan a: done"]


def _wait(worker: source.Worker, n: int) -> list[source.Result]:
    out: list[source.Result] = []
    deadline = time.monotonic() + 5
    while len(out) < n and time.monotonic() < deadline:
        out += worker.results()
        time.sleep(0.005)
    return out


def test_worker_runs_jobs_off_thread_and_reports_errors() -> None:
    woken: list[int] = []
    w = source.Worker(lambda: NoLifecycle(), lambda: woken.append(1))
    try:
        w.submit(("a",), lambda e, emit: type(e).__name__)
        w.submit(("b",), lambda e, emit: 1 / 0)
        results = _wait(w, 2)
        assert [(r.key, r.value) for r in results if r.error is None] == [(("a",), "NoLifecycle")]
        err = next(r for r in results if r.error)
        assert err.key == ("b",) and err.error.startswith("internal error (ZeroDivisionError)")
        assert woken
    finally:
        w.close()


def test_worker_coalesces_repeated_requests() -> None:
    import threading

    gate = threading.Event()
    w = source.Worker(lambda: object())
    try:
        w.submit(("block",), lambda e, emit: gate.wait(5))
        assert w.submit(("x",), lambda e, emit: "first")
        assert not w.submit(("x",), lambda e, emit: "second")  # still queued: coalesced
        assert w.busy(("x",))
        gate.set()
        results = _wait(w, 2)
        assert [r.value for r in results if r.key == ("x",)] == ["first"]
    finally:
        w.close()


class FakeLabels:
    def __init__(self) -> None:
        self.servers = 1

    def get_labels(self) -> list[dict]:
        return [{"name": "app", "puppet_classes": ["nginx"], "servers": self.servers, "ports": [443], "size": None, "alerts": [], "secrets": [], "description": ""}]


def test_worker_hands_back_the_same_object_when_nothing_changed() -> None:
    fake = FakeLabels()
    w = source.Worker(lambda: fake)
    key = ("list", "labels")
    try:
        values = []
        for servers in (1, 1, 2):
            fake.servers = servers
            w.submit(key, source.fetch_job(key, models.SYMBOLS))
            (r,) = _wait(w, 1)
            assert r.error is None
            values.append(r.value)
        assert values[0] is values[1]  # equal: the very same object, the UI skips it
        assert values[2] is not values[1] and values[2].rows[0].cells[1].text == "2"
    finally:
        w.close()


class Warns:
    def __init__(self) -> None:
        self.warnings = ["sizes not shown: labels.yaml:3: bad"]


def test_worker_reports_each_engine_warning_once() -> None:
    engine = Warns()
    w = source.Worker(lambda: engine)
    try:
        for i in range(3):
            engine.warnings.append("sizes not shown: labels.yaml:3: bad")
            w.submit(("x", str(i)), lambda e, emit: None)
        results = _wait(w, 4)
        time.sleep(0.05)
        results += w.results()
        assert [r.log for r in results if r.log] == ["warning: sizes not shown: labels.yaml:3: bad"]
    finally:
        w.close()


def test_worker_survives_an_engine_that_cannot_open() -> None:
    from lab.common.errors import StateError

    def broken():
        raise StateError("state.db: permission denied")

    w = source.Worker(broken)
    try:
        w.submit(("list", "servers"), source.fetch_job(("list", "servers"), models.SYMBOLS))
        (r,) = _wait(w, 1)
        assert r.error == "state.db: permission denied"
    finally:
        w.close()


def test_reload_sees_servers_added_by_another_process(engine: Engine) -> None:
    job = source.fetch_job(("list", "servers"), models.SYMBOLS, reload=True)
    before = job(engine, lambda line: None)
    with Engine.open(engine.paths) as other:
        other.add_server("late-1", "aws", ["app"], "prod", "eu-west")
    detail = source.fetch_job(("detail", "label", "app"), models.SYMBOLS, reload=True)(engine, lambda line: None)
    after = job(engine, lambda line: None)
    assert len(after.rows) == len(before.rows) + 1
    assert [ln.target.name for ln in detail.section("Servers").lines] == ["late-1"]
