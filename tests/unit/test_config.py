"""Loading definitions: the spec's examples load as written; every error names file:line."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from lab.common.config import load_definitions, load_texts, parse_duration
from lab.common.errors import ConfigError

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "common" / "config" / "examples"


def load(text: str, name: str = "defs.yaml"):
    return load_texts([(name, textwrap.dedent(text))])


def error_of(text: str, name: str = "defs.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, name)
    return info.value


def test_spec_examples_load_as_written() -> None:
    d = load_definitions(EXAMPLES)
    assert {"mailserver", "k8s-worker", "postgres", "app"} <= set(d.labels)
    assert d.labels["mailserver"].ports == (25, 587, 993)
    assert d.labels["mailserver"].puppet_classes == ("postfix", "dovecot", "spamassassin", "fail2ban")
    assert {"production", "eu-infrastructure", "all-except-staging", "database-tier", "eu-west-storage", "replica-set-eu"} <= set(d.groups)
    eu = d.groups["eu-infrastructure"]
    assert eu.groups == ("eu-west-compute", "eu-west-storage", "eu-west-network")
    assert eu.exclude is not None and eu.exclude.servers == {"test-box-1"}
    assert eu.exclude.attributes is not None and eu.exclude.attributes.labels == {"experimental"}
    assert d.groups["all-except-staging"].match.environments == {"prod", "dev"}
    assert d.alerts["memory_pressure"].exclude.servers == {"batch-worker-1"}
    assert d.alerts["high_cpu"].for_seconds == 600
    assert d.sizes["medium"].cores == 4 and d.sizes["medium"].memory_mb == 8192
    assert d.sizes["medium"].providers["aws"]["instance_type"] == "t3.large"
    assert d.secrets["mail/tls-cert"].rotate_every == 90 * 86400
    assert d.secrets["tls/node-cert"].per_machine is True
    assert d.secrets["mail/relay-credentials"].mode == 0o600


def test_every_example_secret_and_label_reference_resolves() -> None:
    d = load_definitions(EXAMPLES)
    for label in d.labels.values():
        assert set(label.secrets) <= set(d.secrets)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("labels:\n  web:\n    puppet_clases: [nginx]\n", 3, "unknown key 'puppet_clases' (did you mean 'puppet_classes'?)"),
        ("labels:\n  web:\n    ports: 443\n", 3, "'ports' must be a list"),
        ("labels:\n  web:\n    ports: [443, 70000]\n", 3, "from 1 to 65535"),
        ("labels:\n  web:\n    puppet_classes: nginx\n", 3, "'puppet_classes' must be a list"),
        ("labels:\n  web:\n    size: huge\n", 3, "undefined size 'huge'"),
        ("labels:\n  web:\n    secrets: [db/pw]\n", 3, "undefined secret 'db/pw'"),
        ("labels:\n  Web!:\n    ports: [1]\n", 2, "invalid name 'Web!'"),
        ("groups:\n  g:\n    match:\n      labels: [nope]\n", 4, "undefined label 'nope'"),
        ("groups:\n  g:\n    groups: [missing]\n", 3, "undefined group 'missing'"),
        ("groups:\n  g:\n    description: x\n", 2, "selects nothing"),
        ("groups:\n  g:\n    match: {}\n", 3, "selects nothing"),
        ("groups:\n  g:\n    match:\n      colour: red\n", 4, "unknown key 'colour'"),
        ("groups:\n  g:\n    servers: [a]\n    exclude: {}\n", 4, "excludes nothing"),
        ("alerts:\n  - name: a\n    condition: x > 1\n", 2, "'target' is required"),
        ("alerts:\n  - name: a\n    target: {environment: prod}\n", 2, "'condition' is required"),
        ("alerts:\n  - name: a\n    target: {environment: prod}\n    condition: x > 1\n    severity: loud\n", 5, "'severity' must be one of"),
        ("alerts:\n  - name: a\n    target: {environment: prod}\n    condition: x > 1\n    for: 5 minutes\n", 5, "must be a duration"),
        ("alerts:\n  - target: {environment: prod}\n    condition: x > 1\n", 2, "'name' is required"),
        ("alerts:\n  name: a\n", 1, "expected a list of alerts"),
        ("sizes:\n  s:\n    abstract: {cores: many}\n", 3, "'cores' must be a whole number"),
        ("sizes:\n  s:\n    abstract: {memory: 8 gigs}\n", 3, "'memory' must look like 8GB"),
        ("secrets:\n  a/b:\n    type: magic\n", 3, "'type' must be static or dynamic"),
        ("secrets:\n  a/b:\n    type: dynamic\n", 2, "needs a 'generator'"),
        ("secrets:\n  a/b:\n    per_machine: yes please\n", 3, "must be true or false"),
        ("secrets:\n  a/b:\n    mode: 999\n", 3, "octal file mode"),
        ("secrets:\n  /abs:\n    type: static\n", 2, "invalid name '/abs'"),
        ("labelz:\n  web: {}\n", 1, "unknown key 'labelz' (did you mean 'labels'?)"),
        ("labels:\n  web: {}\n  web: {}\n", 3, "duplicate key 'web' (first at line 2)"),
        ("labels: [web\n", 2, "invalid YAML"),
        ("- just\n- a list\n", 1, "file: expected a mapping"),
    ],
)
def test_errors_name_file_line_and_expectation(text: str, line: int, fragment: str) -> None:
    err = error_of(text)
    assert err.file == "defs.yaml"
    assert err.line == line, str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"defs.yaml:{line}: ")


def test_group_cycle_is_reported_with_its_path() -> None:
    err = error_of(
        """
        groups:
          a:
            groups: [b]
          b:
            groups: [c]
          c:
            groups: [a]
        """
    )
    assert "cycle" in str(err)
    assert "a → b → c → a" in str(err) or "b → c → a → b" in str(err) or "c → a → b → c" in str(err)


def test_cycle_through_an_excluded_group_is_reported() -> None:
    err = error_of(
        """
        groups:
          a:
            servers: [x]
            exclude: {groups: [b]}
          b:
            groups: [a]
        """
    )
    assert "cycle" in str(err)


def test_deep_nesting_does_not_crash_the_loader() -> None:
    lines = ["groups:"] + [f"  g{i}:\n    groups: [g{i + 1}]" for i in range(3000)] + ["  g3000:\n    servers: [x]"]
    d = load("\n".join(lines) + "\n")
    assert len(d.groups) == 3001


def test_duplicate_across_files_names_both_places(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.yaml").write_text("labels:\n  web: {}\n")
    (tmp_path / "b.yaml").write_text("labels:\n\n  web: {}\n")
    with pytest.raises(ConfigError) as info:
        load_definitions(tmp_path)
    assert str(info.value) == f"{tmp_path}/b.yaml:3: labels: 'web' is already defined at {tmp_path}/a.yaml:2"


def test_all_problems_are_collected() -> None:
    err = error_of("labels:\n  a:\n    size: x\n  b:\n    secrets: [y]\n")
    assert "(and 1 more problem)" in str(err)
    assert [p.line for p in err.problems] == [3, 5]


def test_missing_directory_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="definitions directory does not exist"):
        load_definitions(tmp_path / "nope")


def test_hidden_and_other_files_are_ignored(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text("garbage: [")
    (tmp_path / "README.md").write_text("not yaml: [")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "l.yml").write_text("labels:\n  web: {}\n")
    d = load_definitions(tmp_path)
    assert list(d.labels) == ["web"]


def test_invalid_utf8_is_reported(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"labels:\n  \xff: {}\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_definitions(tmp_path)


def test_empty_file_and_empty_sections_are_fine() -> None:
    d = load("# nothing yet\n")
    assert not d.labels
    d = load("labels:\ngroups:\n")
    assert not d.labels and not d.groups


def test_scalar_or_list_under_one_key() -> None:
    d = load(
        """
        labels:
          w: {}
        groups:
          g1: {match: {labels: w, environment: prod}}
          g2: {match: {labels: [w], environment: [prod, dev]}}
        """
    )
    assert d.groups["g1"].match.labels == d.groups["g2"].match.labels == {"w"}
    assert d.groups["g2"].match.environments == {"prod", "dev"}


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("24h", 86400), ("90d", 7776000), ("2w", 1209600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "0s", "-5m", "5y", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
