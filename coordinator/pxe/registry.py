"""Which machines lab is onboarding right now: the one allowlist DHCP, TFTP and HTTP consult.

A MAC that is not here (or whose entry expired) gets silence from DHCP and 404 from HTTP.
Times are wall-clock seconds (``time.time()``), passed in explicitly as ``now``.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator, Mapping

from lab.common.errors import UsageError

DEFAULT_TTL = 2 * 3600.0  # an onboarding that has not finished in two hours stops being served

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def normalize_mac(text: str) -> str:
    """``AA-BB-CC-DD-EE-FF`` / ``aabbccddeeff`` / ``aa:bb:..`` → ``aa:bb:cc:dd:ee:ff``."""
    t = text.strip().lower()
    if not _MAC_RE.match(t):
        raise UsageError(f"not a MAC address: {text!r}")
    h = t.replace(":", "").replace("-", "")
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


def mac_for_url(mac: str) -> str:
    """The form used in URLs and file names: ``aa-bb-cc-dd-ee-ff``."""
    return normalize_mac(mac).replace(":", "-")


@dataclasses.dataclass(frozen=True)
class OnboardingNode:
    """One machine being onboarded: what DHCP needs to answer it and HTTP needs to install it.

    ``token`` is the one-time join token; it is excluded from ``repr`` so it never reaches logs.
    """

    mac: str
    hostname: str
    image: str = "ubuntu-24.04"
    expires_at: float = 0.0
    labels: tuple[str, ...] = ()
    token: str = dataclasses.field(default="", repr=False)
    disk_gb: int | None = None
    size: str | None = None
    coordinator: str = ""  # host:port the agent enrolls with
    domain: str = "lab.internal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        object.__setattr__(self, "labels", tuple(self.labels))
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", self.hostname):
            raise UsageError(f"not a valid hostname: {self.hostname!r}")

    def active(self, now: float) -> bool:
        return now < self.expires_at


class Allowlist(Mapping[str, OnboardingNode]):
    """MAC → OnboardingNode, with expiry. Thread-safe enough for one writer and many readers."""

    def __init__(self, nodes: dict[str, OnboardingNode] | None = None) -> None:
        self._nodes: dict[str, OnboardingNode] = {}
        self._lock = threading.Lock()
        for node in (nodes or {}).values():
            self.add(node)

    def add(self, node: OnboardingNode) -> None:
        with self._lock:
            self._nodes[node.mac] = node

    def allow(self, mac: str, hostname: str, until: float, **kw: object) -> OnboardingNode:
        node = OnboardingNode(mac=mac, hostname=hostname, expires_at=until, **kw)  # type: ignore[arg-type]
        self.add(node)
        return node

    def remove(self, mac: str) -> None:
        with self._lock:
            self._nodes.pop(normalize_mac(mac), None)

    def replace_all(self, nodes: list[OnboardingNode]) -> None:
        with self._lock:
            self._nodes = {n.mac: n for n in nodes}

    def lookup(self, mac: str, now: float) -> OnboardingNode | None:
        """The active entry for ``mac``, or None (unknown, malformed or expired)."""
        node = self._nodes.get(mac)  # fast path: already normalised (DhcpPacket.mac is)
        if node is None:
            try:
                node = self._nodes.get(normalize_mac(mac))
            except UsageError:
                return None
        return node if node is not None and node.active(now) else None

    def allows(self, mac: str, now: float) -> bool:
        return self.lookup(mac, now) is not None

    def __getitem__(self, mac: str) -> OnboardingNode:
        return self._nodes[normalize_mac(mac)]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._nodes))

    def __len__(self) -> int:
        return len(self._nodes)
