"""Hostile input to every route of a real orchestrator process gets a 4xx, never a 5xx.

The routes come from the app itself (and must cover docs/openapi.json), so a new endpoint is fuzzed
without anyone listing it here. Every JSON field of every body, in turn, gets NaN and Infinity
literals, numbers past the float range, huge integers, lone surrogates and invalid UTF-8; whole
bodies, path parameters, query parameters and the token get them too. Blob uploads get hostile
safetensors headers (oversized, deeply nested, non-finite shapes, float offsets, NaN values), which
are then completed as a work result and contributed to a merge round. The schemathesis test
(test_orchestrator_schema.py) covers what the schema generates; this covers what it cannot express.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from fastapi.routing import APIRoute
from iota_orchestrator.api import deps
from iota_orchestrator.app import create_app
from simworker import SimWorker

from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess

ADMIN = "admin-token-for-the-fuzz"
SENTINEL = "__HAZARD__"

# JSON values, as raw bytes, that no field may turn into a 5xx.
VALUE_HAZARDS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"1" * 5000,  # past Python's int-from-text digit limit
    str(2**70).encode(),
    str(-(2**70)).encode(),
    b'"\\ud800"',
    b'"\\udfff"',
    b'"a\\udc00b"',
    b'"\\ud800\\u0041"',
    b'"\xff\xfe"',  # invalid UTF-8
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8
    b'"\xc0\xaf"',  # an overlong encoding
    b'"\\u0000"',
    b'"' + b"x" * 20000 + b'"',
    b'{"\\ud800": 1}',
    b"[" * 3000 + b"]" * 3000,
]
BODY_HAZARDS = [
    *VALUE_HAZARDS,
    b"[" * 100000,
    b'{"a":' * 50000,
    b"\xff\xfe\x00\x00",
    b"\xef\xbb\xbf{}",
    b"",
    b"null",
    b"{",
]
SEGMENT_HAZARDS = ["%ED%A0%80", "%FF", "%00", "%C0%AF", "..%2F..%2Fetc", "x" * 5000, "%F0%9F%98%80", "w1e999"]
QUERY_HAZARDS = ["%ED%A0%80", "%FF", "%00", "1e999", "9" * 19, "-1", "%D9%A1%D9%A2", "NaN", "f" * 40 + "%FF"]
TOKEN_HAZARDS = [
    b"Bearer \xff\xfe",
    b"Bearer " + b"x" * 600,
    b"Bearer",
    b"Basic abc",
    b"Bearer \x7f",
    b"Bearer \xed\xa0\x80",
]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    admin: bool
    route: APIRoute


def app_routes() -> list[Route]:
    out = []
    for r in api_routes(create_app().routes):
        admin = any(d.call is deps.admin for d in r.dependant.dependencies)
        out.extend(Route(m, r.path_format, admin, r) for m in sorted(r.methods))
    return out


def api_routes(routes: list) -> list[APIRoute]:
    """Every APIRoute, also inside included routers (FastAPI >= 0.16x wraps each in an _IncludedRouter)."""
    found = []
    for r in routes:
        if isinstance(r, APIRoute):
            found.append(r)
        elif hasattr(r, "original_router"):
            found.extend(api_routes(r.original_router.routes))
    return found


ROUTES = app_routes()
SCHEMA = create_app().openapi()


def test_the_routes_cover_the_published_schema():
    published = json.loads((Path(__file__).parents[1] / "docs" / "openapi.json").read_text())["paths"]
    ours = {(r.method.lower(), r.path) for r in ROUTES}
    for path, ops in published.items():
        for method in ops:
            assert (method, path) in ours, f"{method} {path} is published but not fuzzed"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    corpus = write_corpus(base / "text", files=1, words=2000)
    with OrchestratorProcess(base / "data", admin_token=ADMIN, tick_s=0.2) as orch:
        m = tiny_manifest(str(corpus))
        # Room for every hostile upload to be accepted (were one not refused) without filling the pipeline.
        train = replace(m.train, lease_s=30.0, max_inflight_per_head=64)
        orch.manifest = replace(m, train=train, merge=replace(m.merge, interval=1))
        orch.run_id = make_run(orch)
        orch.victim = make_run(orch)  # admin routes (stop, abort) act on this one
        yield orch
        assert orch.proc.poll() is None, "the server survived the fuzzing"
        traces = [line for line in orch.lines if "Traceback" in line or "Exception in ASGI" in line]
        assert not traces, "\n".join(orch.lines[-60:])


def make_run(orch) -> str:
    r = requests.post(
        orch.url + "/v1/runs",
        json={"manifest": orch.manifest.to_dict()},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


class Prober:
    """Sends requests and remembers every 5xx (a test fails with all of them listed, not the first)."""

    def __init__(self, url: str) -> None:
        self.url, self.sent, self.errors = url, 0, []
        self.session = requests.Session()

    def send(self, method: str, path: str, token: str | None, body: bytes | None = None, **kw: Any) -> int:
        headers = {"X-Iota-Protocol": "1", **kw.pop("headers", {})}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        req = requests.Request(method, self.url + path, headers=headers, data=body, **kw).prepare()
        req.url = self.url + path  # as written: requests would re-quote a hazard in the path
        r = self.session.send(req, timeout=60)
        self.sent += 1
        if r.status_code >= 500:
            self.errors.append(f"{method} {path[:120]} {body[:300] if body else b''!r} -> {r.text[:200]}")
        return r.status_code

    def check(self) -> None:
        assert not self.errors, f"{len(self.errors)} of {self.sent} requests got a 5xx:\n" + "\n".join(
            self.errors[:40]
        )


def example(schema: dict, real: dict[str, Any]) -> Any:
    """A plausible value for a JSON schema (every property filled in), ids taken from real."""
    if "$ref" in schema:
        return example(SCHEMA["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], real)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"]
            return example(options[0], real) if options else None
    kind = schema.get("type")
    if kind == "object":
        return {k: real.get(k, example(v, real)) for k, v in schema.get("properties", {}).items()}
    if "default" in schema:
        return schema["default"]
    if kind == "array":
        return [example(s, real) for s in schema.get("prefixItems", [schema.get("items", {})])]
    if "enum" in schema:
        return schema["enum"][0]
    return {"integer": 0, "number": 0.0, "boolean": False}.get(kind, "x")


def leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in leaves(v, (*path, k))]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in leaves(v, (*path, i))]
    return [path]


def with_hazard(base: Any, path: tuple, hazard: bytes) -> bytes:
    """base as JSON text with the value at path replaced by the raw bytes of hazard."""
    if not path:
        return hazard
    copy = json.loads(json.dumps(base))
    node = copy
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = SENTINEL
    return json.dumps(copy).encode().replace(json.dumps(SENTINEL).encode(), hazard)


def base_body(route: Route, real: dict[str, Any], manifest: dict) -> Any:
    if route.route.body_field is None:
        return {}
    op = SCHEMA["paths"][route.path][route.method.lower()]
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    body = example(schema, real)
    if isinstance(body, dict) and "manifest" in body:
        body["manifest"] = manifest  # a schema-shaped manifest would be refused before any field is read
    return body


def fill(path: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", value).replace("{" + name + ":path}", value)
    return path


def test_hostile_json_paths_queries_and_tokens_get_no_5xx(target):
    sweeper = SimWorker(target.url, "sweeper").register()
    sweeper.assign(target.run_id, stage=0)
    item = sweeper.claim()
    assert item is not None
    upload = urlsplit(item["upload"]["url"])
    key = upload.path.removeprefix("/v1/blobs/")
    real = {"run_id": target.run_id, "stage": 0, "sha256": "0" * 64}
    manifest = target.manifest.to_dict()
    probe = Prober(target.url)
    for r in ROUTES:
        token = ADMIN if r.admin else sweeper.token
        params = {
            "run_id": target.victim if r.admin else target.run_id,
            "work_id": item["work_id"],
            "contributor_id": sweeper.contributor_id,
            "key": key,
        }
        path = fill(r.path, params)
        query = "?" + upload.query if r.path.startswith("/v1/blobs/") else ""
        base = base_body(r, real, manifest)
        if r.method == "POST":
            for where in leaves(base) if base else [()]:
                for hazard in VALUE_HAZARDS:
                    probe.send(r.method, path, token, with_hazard(base, where, hazard))
            for hazard in BODY_HAZARDS:
                probe.send(r.method, path, token, hazard)
        for name in params:
            if "{" + name in r.path:
                for bad in SEGMENT_HAZARDS:
                    probe.send(r.method, fill(r.path, {**params, name: bad}) + query, token)
        if query:
            for field in ("exp", "sig", "max"):
                for bad in QUERY_HAZARDS:
                    probe.send(r.method, f"{path}?{_swap(upload.query, field, bad)}", token)
        for bad in TOKEN_HAZARDS:
            probe.send(r.method, path + query, None, headers={"Authorization": bad})
    probe.check()
    assert requests.get(target.url + "/v1/health", timeout=10).status_code == 200


def _swap(query: str, field: str, value: str) -> str:
    parts = [p for p in query.split("&") if not p.startswith(field + "=")]
    return "&".join([*parts, f"{field}={value}"])


def safetensors(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def hostile_tensors(name: str, shape: list[int], dtype: str) -> list[bytes]:
    n = 1
    for s in shape:
        n *= s
    size = n * {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    good = {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}

    def header(entry: Any, **extra: Any) -> bytes:
        return json.dumps({name: entry, **extra}).encode()

    nan = (b"\xc0\x7f" if dtype != "F32" else b"\x00\x00\xc0\x7f") * n
    return [
        safetensors(b"{}", length=2**63),
        safetensors(b"{}", length=2**64 - 1),
        safetensors(b'{"a":' * 6000 + b"1" + b"}" * 6000),
        safetensors(b"[" * 6000 + b"]" * 6000),
        safetensors(header({**good, "shape": [1e999]}).replace(b"Infinity", b"1e999"), bytes(size)),
        safetensors(header({**good, "shape": [2**70, 1]}), bytes(size)),
        safetensors(header({**good, "data_offsets": [0.0, float(size)]}), bytes(size)),
        safetensors(header({**good, "data_offsets": [0, 2**70]}), bytes(size)),
        safetensors(header(good, __metadata__=[1, 2]), bytes(size)),
        safetensors(header(good, __metadata__={"a": {"b": 1}}), bytes(size)),
        safetensors(header({**good, "dtype": "F64"}), bytes(size)),
        safetensors(header(good).replace(b"[0,", b"[NaN,").replace(b"[0, ", b"[NaN, "), bytes(size)),
        safetensors(header({"dtype": dtype, "shape": "x", "data_offsets": None}), bytes(size)),
        safetensors(b'{"\xff": 1}', bytes(size)),
        safetensors(header(good).replace(name.encode(), b"\\ud800"), bytes(size)),
        safetensors(header(good), nan),
        safetensors(header(good), bytes(size // 2)),
        safetensors(b"\x00" * 64),
        b"\x01\x02",
        b"",
    ]


def upload_and_report(probe: Prober, url: str, data: bytes, report: Any) -> None:
    sha = hashlib.sha256(data).hexdigest()
    probe.send(
        "PUT", url, None, data, headers={"X-Iota-Sha256": sha, "Content-Type": "application/octet-stream"}
    )
    report(sha, len(data))


def test_hostile_safetensors_uploads_get_no_5xx(target):
    w = SimWorker(target.url, "uploader").register()
    w.assign(target.run_id, stage=0)
    m = target.manifest
    shape = [m.train.batch_size, m.train.seq_len, m.model.bottleneck_dim]
    dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[m.model.boundary_dtype]
    probe = Prober(target.url)
    item = w.claim()
    for data in hostile_tensors("activations", shape, dtype):
        assert item is not None

        def complete(sha: str, size: int) -> None:
            nonlocal item
            body = json.dumps({"sha256": sha, "size": size}).encode()
            # Refused, the item stays claimed for a corrected upload: the next hostile one goes there.
            if probe.send("POST", f"/v1/work/{item['work_id']}/complete", w.token, body) == 200:
                item = w.claim()

        upload_and_report(probe, item["upload"]["url"], data, complete)
    # A round opens from counted work (merge_checks), not a reported step: a fresh head (the uploader's
    # claims are benched for its refusals) carries samples through a body and a tail, forward and back.
    w = SimWorker(target.url, "merger").register()
    w.assign(target.run_id, stage=0)
    body_w, tail_w = SimWorker(target.url, "body").register(), SimWorker(target.url, "tail").register()
    body_w.assign(target.run_id, stage=1)
    tail_w.assign(target.run_id, stage=2)
    w.heartbeat()  # holds epoch 0 from here
    for _ in range(m.merge.interval * m.train.backward_per_step):
        for x in (w, body_w, tail_w, body_w, w):
            x.do(x.claim(wait_s=5.0))
    offer = w.heartbeat()["merge"]
    assert offer is not None, "a merge round opens"
    for data in hostile_tensors("update", [16], "F32"):

        def contribute(sha: str, size: int) -> None:
            body = {"run_id": w.run_id, "stage": 0, "epoch": offer["epoch"], "sha256": sha, "size": size}
            probe.send("POST", "/v1/merge/complete", w.token, json.dumps(body).encode())

        upload_and_report(probe, offer["upload"]["url"], data, contribute)
    probe.check()
