"""The ``dns:`` section of ``$LAB_HOME/config.yaml`` → one frozen :class:`DnsConfig`.

::

    dns:
      zone: lab.internal                 # required; nodes become <name>.lab.internal
      backend: rfc2136                   # rfc2136 (default) | powerdns
      server: 127.0.0.1                  # the primary server's IP address
      port: 53
      tsig_key_file: /etc/lab/dns.key    # tsig-keygen output, mode 0600; relative to config.yaml
      # tsig_key: {name: lab-dns, algorithm: hmac-sha256, secret: "base64…"}   # or inline
      reverse_zones: [10.0.1.0/24, "2001:db8:1::/48", 2.0.10.in-addr.arpa]
      ttl: 300
      timeout: 5
      powerdns: {api_url: "http://127.0.0.1:8081", api_key_file: /etc/lab/pdns.key, server_id: localhost}

Every problem is a ConfigError naming ``file:line``. Secrets (the TSIG secret, the PowerDNS API
key) are read from files that only their owner may read, and never appear in ``repr``/logs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import os
import pathlib
import re
import stat
from typing import Any

import dns.name

from lab.common.config._settings import load_section
from lab.common.config._yaml import LMap, LSeq
from lab.common.errors import ConfigError
from lab.coordinator.dns._names import reverse_zone, zone_name

DEFAULT_PORT = 53
DEFAULT_TTL = 300
DEFAULT_TIMEOUT = 5.0
DEFAULT_SERVER = "127.0.0.1"
DEFAULT_ALGORITHM = "hmac-sha256"
ALGORITHMS = frozenset({"hmac-sha256", "hmac-sha384", "hmac-sha512"})
BACKENDS = frozenset({"rfc2136", "powerdns"})
DEFAULT_PDNS_SERVER_ID = "localhost"
MAX_SECRET_FILE_BYTES = 64 * 1024

_KEYS = frozenset(
    {"zone", "backend", "server", "port", "tsig_key_file", "tsig_key", "reverse_zones", "ttl", "timeout", "powerdns"}
)
_KEY_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})$")


@dataclasses.dataclass(frozen=True, slots=True)
class TsigKey:
    """A TSIG key. ``repr`` never shows the secret."""

    name: str
    algorithm: str
    secret: bytes = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return f"TsigKey(name={self.name!r}, algorithm={self.algorithm!r}, secret=<hidden>)"


@dataclasses.dataclass(frozen=True, slots=True)
class PowerDnsSettings:
    api_url: str
    api_key: str = dataclasses.field(repr=False)
    server_id: str = DEFAULT_PDNS_SERVER_ID

    def __repr__(self) -> str:
        return f"PowerDnsSettings(api_url={self.api_url!r}, api_key=<hidden>, server_id={self.server_id!r})"


@dataclasses.dataclass(frozen=True, slots=True)
class DnsConfig:
    zone: dns.name.Name
    backend: str = "rfc2136"
    server: str = DEFAULT_SERVER
    port: int = DEFAULT_PORT
    tsig: TsigKey | None = None
    reverse_zones: tuple[dns.name.Name, ...] = ()
    ttl: int = DEFAULT_TTL
    timeout: float = DEFAULT_TIMEOUT
    powerdns: PowerDnsSettings | None = None
    source: str = "<config>"


# -- reading -------------------------------------------------------------------------------


def load_dns_config(home: str | os.PathLike[str]) -> DnsConfig | None:
    """Read ``dns:`` from ``<home>/config.yaml``; None when the file or the section is absent."""
    found = load_section(home, "dns")
    if found is None or found[0] is None:  # an empty ``dns:`` is no DNS
        return None
    return parse_dns_config(*found)


def parse_dns_config(section: Any, source: str = "<config>", line: int | None = None) -> DnsConfig:
    """Validate one ``dns:`` mapping (as loaded by lab.common.config._yaml, or a plain dict)."""
    if not isinstance(section, dict):
        raise ConfigError("'dns' must be a mapping with at least 'zone'", source, line)

    def at(key: str) -> int | None:
        return section.line_of(key) if isinstance(section, LMap) else line

    def fail(key: str | None, message: str) -> ConfigError:
        return ConfigError(f"dns: {message}", source, at(key) if key else line)

    unknown = sorted(set(section) - _KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_KEYS))})")
    if "zone" not in section:
        raise fail(None, "'zone' is required (e.g. zone: lab.internal)")

    def wrap(key: str, func, *args):
        try:
            return func(*args)
        except ConfigError as exc:  # keep the inner file (a key file) in the message
            raise fail(key, str(exc) if exc.file and exc.file != source else exc.message) from exc

    zone = wrap("zone", zone_name, section["zone"], "zone")

    backend = section.get("backend", "rfc2136")
    if backend not in BACKENDS:
        raise fail("backend", f"backend must be one of {', '.join(sorted(BACKENDS))}, not {backend!r}")

    server = section.get("server", DEFAULT_SERVER)
    try:
        server = str(ipaddress.ip_address(server))
    except ValueError as exc:
        raise fail("server", f"server must be an IP address, not {server!r}") from exc

    port = _integer(section, "port", DEFAULT_PORT, 1, 65535, fail)
    ttl = _integer(section, "ttl", DEFAULT_TTL, 0, 2**31 - 1, fail)
    timeout = section.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
        raise fail("timeout", f"timeout must be a number of seconds in (0, 300], not {timeout!r}")

    reverse = section.get("reverse_zones", [])
    if not isinstance(reverse, list):
        raise fail("reverse_zones", "reverse_zones must be a list of networks or zone names")
    zones: list[dns.name.Name] = []
    for i, item in enumerate(reverse):
        try:
            zones.append(reverse_zone(item))
        except ConfigError as exc:
            where = reverse.line_of(i) if isinstance(reverse, LSeq) else at("reverse_zones")
            raise ConfigError(f"dns: {exc.message}", source, where) from exc
    if len(set(zones)) != len(zones):
        raise fail("reverse_zones", "reverse_zones lists the same zone twice")

    base = pathlib.Path(source).parent if source and not source.startswith("<") else pathlib.Path.cwd()
    tsig: TsigKey | None = None
    if "tsig_key_file" in section and "tsig_key" in section:
        raise fail("tsig_key", "give either tsig_key_file or tsig_key, not both")
    if "tsig_key_file" in section:
        tsig = wrap("tsig_key_file", read_tsig_key_file, _path(section["tsig_key_file"], base, fail))
    elif "tsig_key" in section:
        tsig = wrap("tsig_key", _inline_key, section["tsig_key"], source)

    pdns: PowerDnsSettings | None = None
    if backend == "rfc2136":
        if tsig is None:
            raise fail(None, "the rfc2136 backend needs a TSIG key: set tsig_key_file (tsig-keygen output, mode 0600)")
        if "powerdns" in section:
            raise fail("powerdns", "'powerdns' settings given but backend is rfc2136")
    else:
        if "powerdns" not in section:
            raise fail("backend", "backend powerdns needs 'powerdns: {api_url: ..., api_key_file: ...}'")
        pdns = _powerdns(section.get("powerdns"), base, fail)

    return DnsConfig(
        zone=zone,
        backend=backend,
        server=server,
        port=port,
        tsig=tsig,
        reverse_zones=tuple(zones),
        ttl=ttl,
        timeout=float(timeout),
        powerdns=pdns,
        source=source,
    )


def _integer(section: dict, key: str, default: int, lo: int, hi: int, fail) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise fail(key, f"{key} must be a whole number from {lo} to {hi}, not {value!r}")
    return value


def _path(value: Any, base: pathlib.Path, fail) -> pathlib.Path:
    if not isinstance(value, str) or not value:
        raise fail("tsig_key_file", f"tsig_key_file must be a path, not {value!r}")
    p = pathlib.Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _powerdns(value: Any, base: pathlib.Path, fail) -> PowerDnsSettings:
    if not isinstance(value, dict):
        raise fail("powerdns", "backend powerdns needs 'powerdns: {api_url: ..., api_key_file: ...}'")
    unknown = sorted(set(value) - {"api_url", "api_key_file", "server_id"})
    if unknown:
        raise fail("powerdns", f"powerdns: unknown key '{unknown[0]}' (allowed: api_url, api_key_file, server_id)")
    url = value.get("api_url")
    if not isinstance(url, str) or not re.match(r"^https?://", url):
        raise fail("powerdns", f"powerdns.api_url must be an http(s) URL, not {url!r}")
    key_file = value.get("api_key_file")
    if not isinstance(key_file, str) or not key_file:
        raise fail("powerdns", "powerdns.api_key_file is required (a file holding the X-API-Key, mode 0600)")
    path = pathlib.Path(key_file).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        api_key = read_secret_file(path).decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError("the PowerDNS API key must be ASCII text", str(path)) from exc
    except ConfigError as exc:
        raise fail("powerdns", f"powerdns.api_key_file: {exc}") from exc
    if not api_key:
        raise ConfigError("the PowerDNS API key file is empty", str(path))
    server_id = value.get("server_id", DEFAULT_PDNS_SERVER_ID)
    if not isinstance(server_id, str) or not re.match(r"^[A-Za-z0-9._-]+$", server_id):
        raise fail("powerdns", f"powerdns.server_id must be a plain name, not {server_id!r}")
    return PowerDnsSettings(url.rstrip("/"), api_key, server_id)


# -- secrets ---------------------------------------------------------------------------------


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """A small file only its owner may read (no group/other bits); ConfigError naming the file."""
    p = pathlib.Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read secret file: {exc.strerror}", str(p)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("secret file is not a regular file", str(p))
        if st.st_mode & 0o077:
            raise ConfigError(
                f"secret file is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {p}",
                str(p),
            )
        if st.st_size > MAX_SECRET_FILE_BYTES:
            raise ConfigError(f"secret file is larger than {MAX_SECRET_FILE_BYTES} bytes", str(p))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_SECRET_FILE_BYTES + 1)
    finally:
        os.close(fd)


_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*|#[^\n]*", re.S)
_KEY_BLOCK = re.compile(r'key\s+"?([^"\s{]+)"?\s*\{(.*?)\}\s*;', re.S)
_STATEMENT = re.compile(r'(\w+)\s+"?([^";]+?)"?\s*;')


def parse_tsig_key(text: str, source: str = "<key>") -> TsigKey:
    """Parse BIND's key syntax (what ``tsig-keygen NAME`` prints) holding exactly one key."""
    body = _COMMENTS.sub("", text)
    blocks = _KEY_BLOCK.findall(body)
    if len(blocks) != 1:
        raise ConfigError(
            "expected exactly one 'key \"NAME\" { algorithm hmac-sha256; secret \"...\"; };' block "
            f"(as printed by tsig-keygen), found {len(blocks)}",
            source,
        )
    name, inner = blocks[0]
    fields = {k.lower(): v.strip() for k, v in _STATEMENT.findall(inner)}
    return _make_key(name, fields.get("algorithm", DEFAULT_ALGORITHM), fields.get("secret"), source)


def read_tsig_key_file(path: str | os.PathLike[str]) -> TsigKey:
    data = read_secret_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("TSIG key file is not UTF-8 text", str(path)) from exc
    return parse_tsig_key(text, str(path))


def _inline_key(value: Any, source: str) -> TsigKey:
    if not isinstance(value, dict) or set(value) - {"name", "algorithm", "secret"}:
        raise ConfigError("tsig_key must be a mapping with name, secret and optionally algorithm")
    if source and not source.startswith("<"):
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise ConfigError(f"cannot stat {source}: {exc.strerror}") from exc
        if mode & 0o077:
            raise ConfigError(
                f"tsig_key holds a secret but {source} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it or use tsig_key_file"
            )
    return _make_key(value.get("name"), value.get("algorithm", DEFAULT_ALGORITHM), value.get("secret"), source)


def _make_key(name: Any, algorithm: Any, secret: Any, source: str) -> TsigKey:
    if not isinstance(name, str) or not _KEY_NAME.match(name.rstrip(".")):
        raise ConfigError(f"TSIG key name {name!r} is not a valid key name", source)
    algorithm = str(algorithm).lower().rstrip(".")
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"TSIG algorithm {algorithm!r} is not allowed (use one of {', '.join(sorted(ALGORITHMS))})", source
        )
    if not isinstance(secret, str) or not secret:
        raise ConfigError(f"TSIG key {name!r} has no secret", source)
    try:
        raw = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"TSIG key {name!r}: the secret is not valid base64", source) from exc
    if len(raw) < 16:
        raise ConfigError(f"TSIG key {name!r}: the secret is shorter than 16 bytes", source)
    return TsigKey(name.rstrip("."), algorithm, raw)
