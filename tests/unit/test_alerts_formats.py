"""The renderer's fast paths against their references: the hand-written YAML emitter reads back
(PyYAML) as the data it was given, whatever the strings; the file_sd writer gives json.dumps's
bytes; the label-derived alert/port/class lists equal the complete server views of the targeting
engine for random fleets."""

from __future__ import annotations

import json

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.common.config import load_definitions
from lab.common.targeting import Fleet
from lab.coordinator.alerts.render import _dump_file_sd, _dump_yaml, _extras, _literal, _yaml_scalar
from lab.coordinator.engine import EXAMPLES
from lab.coordinator.state import Server

DEFS = load_definitions(EXAMPLES)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=300)
@given(TEXT)
def test_every_string_reads_back_as_itself(text: str) -> None:
    assert yaml.safe_load(f"k: {_yaml_scalar(text)}\n") == {"k": text}
    assert yaml.safe_load(f"- {_yaml_scalar(text)}\n") == [text]


def test_scalars_stay_readable() -> None:
    assert _yaml_scalar("auto:port:443") == "auto:port:443"
    assert _yaml_scalar("5m") == "5m"
    assert _yaml_scalar("warning") == "warning"
    assert _yaml_scalar("yes") == "'yes'" and _yaml_scalar("No") == "'No'" and _yaml_scalar("null") == "'null'"
    assert _yaml_scalar("0x1F") == "'0x1F'" and _yaml_scalar("1e3") == "'1e3'" and _yaml_scalar("") == "''"
    assert _yaml_scalar('up{a="b"} > 1') == "'up{a=\"b\"} > 1'"
    assert _yaml_scalar("it's") == "'it''s'"
    assert _yaml_scalar("a\nb") == '"a\\nb"'
    assert _yaml_scalar("x\u2028y") == '"x\\u2028y"'


SCALAR = st.one_of(TEXT, st.integers(), st.booleans(), st.none())
DATA = st.recursive(
    st.dictionaries(TEXT, SCALAR, max_size=3),
    lambda inner: st.dictionaries(TEXT, st.one_of(SCALAR, inner, st.lists(inner, max_size=3)), max_size=3),
    max_leaves=12,
)


@settings(max_examples=200)
@given(DATA)
def test_documents_read_back_as_the_data(data: dict) -> None:
    assert yaml.safe_load(_dump_yaml(data)) == (data or None)


@given(st.lists(st.tuples(TEXT, st.dictionaries(TEXT, TEXT, max_size=4)), max_size=5))
def test_file_sd_bytes_equal_json_dumps(entries) -> None:
    reference = json.dumps([{"targets": [t], "labels": labels} for t, labels in entries], indent=2, ensure_ascii=False) + "\n"
    assert _dump_file_sd(entries) == reference.encode()


def test_literal_text_is_never_expanded() -> None:
    assert _literal("no braces") == "no braces"
    assert _literal("{{ $value }}") == '{{ "{{" }} $value }}'


@settings(max_examples=50)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from([*sorted(DEFS.labels), "unknown-label"]), max_size=4),
            st.sampled_from([None, "small", "large"]),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_label_derived_items_equal_the_server_views(spec) -> None:
    servers = [Server(f"s{i}", "aws", tuple(labels), "prod", "eu-west", size) for i, (labels, size) in enumerate(spec)]
    fleet = Fleet(DEFS, servers)
    extras = _extras(fleet)
    views = fleet.compile_all()
    for s in servers:
        view = views[s.name]
        targeted = {a for a in DEFS.alerts if s.name in fleet.alert_servers(a)[0]}
        from_view = {
            (item.name, src)
            for item in view.alerts
            for src in item.sources
            if not (item.name in DEFS.alerts and (item.name in targeted or not src.startswith("label:")))
        }
        mine = {(n, src) for n, src in extras.named[s.name] if not (n in DEFS.alerts and (n in targeted or not src.startswith("label:")))}
        assert mine == from_view
        assert extras.ports[s.name] == tuple(view.ports)
        assert extras.classes[s.name] == tuple(i.name for i in view.puppet_classes)
