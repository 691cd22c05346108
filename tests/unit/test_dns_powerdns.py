"""PowerDNS HTTP API skeleton: request bodies and error mapping, over httpx.MockTransport."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")

from lab.coordinator.dns import DnsAuthError, DnsBackend, DnsUpdateError  # noqa: E402
from lab.coordinator.dns.config import PowerDnsSettings  # noqa: E402
from lab.coordinator.dns.powerdns import PowerDnsBackend  # noqa: E402

FQDN = "web-1.lab.internal."
SETTINGS = PowerDnsSettings("http://127.0.0.1:8081", "api-key-123", "localhost")


class Api:
    """A tiny in-memory PowerDNS: zone → {(name, type): [contents]}."""

    def __init__(self, status: int = 204) -> None:
        self.zones: dict[str, dict[tuple[str, str], list[str]]] = {}
        self.requests: list[httpx.Request] = []
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers["X-API-Key"] == "api-key-123"
        zone = request.url.path.removeprefix("/api/v1/servers/localhost/zones/")
        data = self.zones.setdefault(zone, {})
        if self.status >= 300:
            return httpx.Response(self.status, json={"error": "nope"})
        if request.method == "GET":
            name, rtype = request.url.params["rrset_name"], request.url.params["rrset_type"]
            contents = data.get((name, rtype), [])
            rrsets = [{"name": name, "type": rtype, "records": [{"content": c, "disabled": False} for c in contents]}] if contents else []
            return httpx.Response(200, json={"name": zone, "rrsets": rrsets})
        for rr in json.loads(request.content)["rrsets"]:
            key = (rr["name"], rr["type"])
            if rr["changetype"] == "DELETE":
                data.pop(key, None)
            else:
                data[key] = [r["content"] for r in rr["records"]]
        return httpx.Response(204)


def backend(api: Api) -> PowerDnsBackend:
    return PowerDnsBackend("lab.internal", SETTINGS, reverse_zones=["1.0.10.in-addr.arpa"], ttl=60, transport=httpx.MockTransport(api))


def test_is_a_backend() -> None:
    b = backend(Api())
    assert isinstance(b, DnsBackend) and "api-key-123" not in repr(b)
    b.close()


def test_plan_register_bodies() -> None:
    body = backend(Api()).plan_register("web-1", ["10.0.1.5", "192.0.2.1"])
    assert {z.to_text(): v for z, v in body.items()} == {
        "lab.internal.": [
            {"name": FQDN, "type": "A", "ttl": 60, "changetype": "REPLACE",
             "records": [{"content": "10.0.1.5", "disabled": False}, {"content": "192.0.2.1", "disabled": False}]},
            {"name": FQDN, "type": "AAAA", "changetype": "DELETE"},
        ],
        "1.0.10.in-addr.arpa.": [
            {"name": "5.1.0.10.in-addr.arpa.", "type": "PTR", "ttl": 60, "changetype": "REPLACE",
             "records": [{"content": FQDN, "disabled": False}]},
        ],
    }


def test_register_move_remove() -> None:
    api = Api()
    b = backend(api)
    b.register("web-1", ["10.0.1.5"])
    assert api.zones["1.0.10.in-addr.arpa."][("5.1.0.10.in-addr.arpa.", "PTR")] == [FQDN]
    api.zones["1.0.10.in-addr.arpa."][("7.1.0.10.in-addr.arpa.", "PTR")] = ["other.lab.internal."]
    change = b.register("web-1", ["10.0.1.6"])
    assert change.removed == ("10.0.1.5",) and change.added == ("10.0.1.6",)
    assert ("5.1.0.10.in-addr.arpa.", "PTR") not in api.zones["1.0.10.in-addr.arpa."]
    assert b.lookup("web-1").ptr_ok()
    b.remove("web-1", ["10.0.1.7"])  # not ours: other node's PTR stays
    assert api.zones["1.0.10.in-addr.arpa."][("7.1.0.10.in-addr.arpa.", "PTR")] == ["other.lab.internal."]
    gone = b.remove("web-1")
    assert gone.removed == ("10.0.1.6",) and api.zones["lab.internal."] == {}


@pytest.mark.parametrize(("status", "kind"), [(401, DnsAuthError), (403, DnsAuthError), (422, DnsUpdateError), (500, DnsUpdateError)])
def test_http_errors(status: int, kind: type) -> None:
    with pytest.raises(kind, match=f"HTTP {status}: nope"):
        backend(Api(status)).register("web-1", ["10.0.1.5"])


def test_transport_failure() -> None:
    def refuse(request):
        raise httpx.ConnectError("refused")

    b = PowerDnsBackend("lab.internal", SETTINGS, transport=httpx.MockTransport(refuse))
    with pytest.raises(DnsUpdateError, match="cannot reach the PowerDNS API"):
        b.lookup("web-1")
