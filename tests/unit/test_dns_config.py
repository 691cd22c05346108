"""The ``dns:`` section of config.yaml and TSIG key files: errors name the file (and line)."""

from __future__ import annotations

import base64
import pathlib

import pytest

from lab.common.errors import ConfigError
from lab.coordinator.dns import DnsManager, load_dns_config, parse_dns_config
from lab.coordinator.dns._names import reverse_zone
from lab.coordinator.dns.config import parse_tsig_key, read_tsig_key_file

SECRET = base64.b64encode(bytes(range(32))).decode()
KEYGEN = f'key "lab-dns" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n'


@pytest.fixture()
def home(tmp_path: pathlib.Path) -> pathlib.Path:
    h = tmp_path / "home"
    h.mkdir()
    key = h / "dns.key"
    key.write_text(KEYGEN)
    key.chmod(0o600)
    return h


def write(home: pathlib.Path, text: str, mode: int = 0o600) -> pathlib.Path:
    path = home / "config.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_full_section(home: pathlib.Path) -> None:
    write(
        home,
        "definitions: /somewhere\n"
        "dns:\n"
        "  zone: Lab.Internal.\n"
        "  server: 127.0.0.1\n"
        "  port: 5353\n"
        "  tsig_key_file: dns.key\n"  # relative to config.yaml
        "  reverse_zones: [10.0.1.0/24, '2001:db8:1::/48', 2.0.10.in-addr.arpa]\n"
        "  ttl: 60\n"
        "  timeout: 2.5\n",
    )
    cfg = load_dns_config(home)
    assert cfg is not None
    assert cfg.zone.to_text() == "lab.internal." and cfg.port == 5353 and cfg.ttl == 60 and cfg.timeout == 2.5
    assert [z.to_text() for z in cfg.reverse_zones] == [
        "1.0.10.in-addr.arpa.",
        "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
        "2.0.10.in-addr.arpa.",
    ]
    assert cfg.tsig is not None and cfg.tsig.name == "lab-dns" and cfg.tsig.secret == bytes(range(32))
    assert SECRET not in repr(cfg) and "<hidden>" in repr(cfg)


def test_defaults(home: pathlib.Path) -> None:
    write(home, f"dns:\n  zone: lab.internal\n  tsig_key_file: {home / 'dns.key'}\n")
    cfg = load_dns_config(home)
    assert cfg is not None and (cfg.server, cfg.port, cfg.ttl, cfg.timeout, cfg.backend) == (
        "127.0.0.1", 53, 300, 5.0, "rfc2136"
    )
    assert cfg.reverse_zones == ()


def test_no_file_or_no_section_means_disabled(home: pathlib.Path) -> None:
    assert load_dns_config(home) is None
    assert not DnsManager.from_home(home).enabled
    write(home, "definitions: /x\n")
    assert load_dns_config(home) is None


@pytest.mark.parametrize(
    ("body", "line", "text"),
    [
        ("dns: [1]\n", 1, "'dns' must be a mapping"),
        ("dns:\n  server: 127.0.0.1\n", 1, "'zone' is required"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  zonee: x\n", 4, "unknown key 'zonee'"),
        ("dns:\n  zone: lab_internal\n  tsig_key_file: dns.key\n", 2, "not a valid DNS label"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  server: ns1.example\n", 4, "must be an IP address"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  port: 70000\n", 4, "port must be"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  ttl: -1\n", 4, "ttl must be"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  timeout: 0\n", 4, "timeout must be"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  backend: bind\n", 4, "backend must be"),
        (
            "dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  reverse_zones:\n    - 10.0.1.0/24\n    - 10.0.2.0/26\n",
            6,
            "classless",
        ),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  reverse_zones: [example.com]\n", 4, "in-addr.arpa"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  reverse_zones: [10.0.1.0/24, 1.0.10.in-addr.arpa]\n", 4, "twice"),
        ("dns:\n  zone: lab.internal\n", 1, "needs a TSIG key"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: missing.key\n", 3, "missing.key: cannot read"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  tsig_key: {name: a}\n", 4, "not both"),
        ("dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n  zone: other\n", 4, "duplicate key"),
        ("dns:\n  zone: lab.internal\n  backend: powerdns\n", 3, "backend powerdns needs"),
    ],
)
def test_errors_carry_file_and_line(home: pathlib.Path, body: str, line: int, text: str) -> None:
    path = write(home, body)
    with pytest.raises(ConfigError) as info:
        load_dns_config(home)
    assert info.value.file == str(path) and info.value.line == line, str(info.value)
    assert text in str(info.value)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_key_file_readable_by_others_is_refused(home: pathlib.Path) -> None:
    (home / "dns.key").chmod(0o644)
    write(home, "dns:\n  zone: lab.internal\n  tsig_key_file: dns.key\n")
    with pytest.raises(ConfigError, match=r"dns\.key: secret file is accessible by group or others \(mode 0644\); run: chmod 600"):
        load_dns_config(home)


def test_inline_key_needs_a_private_config_file(home: pathlib.Path) -> None:
    body = f"dns:\n  zone: lab.internal\n  tsig_key: {{name: lab-dns, secret: '{SECRET}'}}\n"
    write(home, body, mode=0o600)
    cfg = load_dns_config(home)
    assert cfg is not None and cfg.tsig is not None and cfg.tsig.algorithm == "hmac-sha256"
    write(home, body, mode=0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        load_dns_config(home)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "found 0"),
        (KEYGEN + KEYGEN.replace("lab-dns", "other"), "found 2"),
        (KEYGEN.replace("hmac-sha256", "hmac-md5"), "not allowed"),
        (KEYGEN.replace(SECRET, "not*base64"), "not valid base64"),
        (KEYGEN.replace(SECRET, base64.b64encode(b"short").decode()), "shorter than 16"),
        ('key "lab-dns" { algorithm hmac-sha256; };', "has no secret"),
    ],
)
def test_bad_key_files(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_tsig_key(text, "/etc/lab/dns.key")
    assert info.value.file == "/etc/lab/dns.key"
    assert SECRET not in str(info.value)


def test_key_file_with_comments_and_other_algorithm(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "k"
    path.write_text("# made by tsig-keygen\n// note\n/* block */" + KEYGEN.replace("hmac-sha256", "HMAC-SHA512"))
    path.chmod(0o600)
    key = read_tsig_key_file(path)
    assert (key.name, key.algorithm, key.secret) == ("lab-dns", "hmac-sha512", bytes(range(32)))


def test_powerdns_settings(home: pathlib.Path) -> None:
    api = home / "pdns.key"
    api.write_text("s3cret-api-key\n")
    api.chmod(0o600)
    write(home, "dns:\n  zone: lab.internal\n  backend: powerdns\n  powerdns:\n    api_url: http://127.0.0.1:8081/\n    api_key_file: pdns.key\n")
    cfg = load_dns_config(home)
    assert cfg is not None and cfg.powerdns is not None
    assert cfg.powerdns.api_url == "http://127.0.0.1:8081" and cfg.powerdns.api_key == "s3cret-api-key"
    assert cfg.powerdns.server_id == "localhost" and "s3cret" not in repr(cfg)


def test_parse_a_plain_dict() -> None:
    with pytest.raises(ConfigError, match="<config>: dns: 'zone' is required"):
        parse_dns_config({})


@pytest.mark.parametrize(
    ("text", "zone"),
    [
        ("10.0.0.0/8", "10.in-addr.arpa."),
        ("192.168.4.0/24", "4.168.192.in-addr.arpa."),
        ("2001:db8::/32", "8.b.d.0.1.0.0.2.ip6.arpa."),
        ("2001:db8:1:2::/64", "2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."),
        ("2001:db8:1::/52", "0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."),
        ("4.168.192.IN-ADDR.ARPA.", "4.168.192.in-addr.arpa."),
    ],
)
def test_reverse_zone_names(text: str, zone: str) -> None:
    assert reverse_zone(text).to_text() == zone


@pytest.mark.parametrize("bad", ["10.0.1.0/25", "10.0.1.1/24", "2001:db8::/30", "0.0.0.0/0", "in-addr.arpa", "lab.internal"])
def test_bad_reverse_zones(bad: str) -> None:
    with pytest.raises(ConfigError):
        reverse_zone(bad)
