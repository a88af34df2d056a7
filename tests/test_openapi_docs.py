"""/openapi.json and /docs over a real socket: the page and its assets come from the server itself; the
document's info, descriptions, defaults, servers and additionalProperties agree with the server."""

from __future__ import annotations

import copy
import datetime
import enum
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

import kubrpc
from kubrpc import _docs
from kubrpc.openapi import Info

pytestmark = pytest.mark.anyio


class Mood(enum.Enum):
    """How a leaf feels."""

    CALM = "calm"
    WILD = "wild"


@dataclass
class Leaf:
    """One leaf of a branch."""

    v: int
    note: str = "n"
    mood: Mood = Mood.CALM


@dataclass
class Branch:
    leaves: list[Leaf]
    by_name: dict[str, Leaf]
    maybe: Leaf | None = None
    pair: tuple[Leaf, int] | None = None


@dataclass
class Tree:
    root: Branch
    children: list[Branch] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@kubrpc.interface(name="garden.Garden")
class Garden(Protocol):
    """Grows trees.

    Each tree is sent back as it was planted.
    """

    async def plant(self, tree: Tree, label: str = "x", when: datetime.date = datetime.date(2024, 1, 2)) -> Tree:
        """Plant a tree.

        The label names it.
        """
        ...

    async def count(self, tree: Tree, *, deep: bool = False, mood: Mood = Mood.WILD) -> int: ...


class GardenImpl:
    async def plant(self, tree: Tree, label: str = "x", when: datetime.date = datetime.date(2024, 1, 2)) -> Tree:
        return tree

    async def count(self, tree: Tree, *, deep: bool = False, mood: Mood = Mood.WILD) -> int:
        return len(tree.root.leaves)


TREE: dict[str, Any] = {
    "root": {
        "leaves": [{"v": 1}, {"v": 2, "note": "b", "mood": "wild"}],
        "by_name": {"a": {"v": 3}},
        "maybe": {"v": 4},
        "pair": [{"v": 5}, 6],
    },
    "children": [{"leaves": [{"v": 7}], "by_name": {}}],
    "extra": {"k": {"deep": [1, {"deeper": True}]}},
}


@pytest.fixture
async def garden() -> AsyncIterator[tuple[httpx.AsyncClient, kubrpc.Server]]:
    server = kubrpc.Server(header_timeout=5, drain_timeout=1)
    server.register(Garden, GardenImpl())
    async with (
        server.serve("http://127.0.0.1:0") as listener,
        httpx.AsyncClient(base_url=listener.url, timeout=10) as client,
    ):
        yield client, server


class _Links(HTMLParser):
    """Every URL a page makes the browser load: src, href and data-openapi attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v for k, v in attrs if v is not None and k in ("src", "href", "data-openapi")}
        self.urls += found.values()
        if tag == "script" and "src" not in found:
            self.inline_scripts += 1


@pytest.mark.parametrize("page", ["/docs", "/docs/"])
async def test_docs_page_and_every_asset_load_from_the_server_itself(
    garden: tuple[httpx.AsyncClient, kubrpc.Server], page: str
) -> None:
    client, _ = garden
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert "<title>garden.Garden - API docs</title>" in response.text
    links = _Links()
    links.feed(response.text)
    assert links.inline_scripts == 0
    assert len(links.urls) == 6, links.urls  # css, 2 icons, bundle, init script, the document
    kinds = set()
    for url in links.urls:
        parts = urlsplit(url)
        # Relative: no scheme, no host (no CDN), no leading slash (works under any prefix).
        assert not parts.scheme and not parts.netloc and not url.startswith("/"), url
        absolute = urljoin(str(response.url), url)
        assert urlsplit(absolute).netloc == urlsplit(str(response.url)).netloc
        asset = await client.get(absolute)
        assert asset.status_code == 200, (url, asset.status_code)
        content_type = asset.headers["content-type"]
        kinds.add(content_type)
        if urlsplit(absolute).path == "/openapi.json":
            assert asset.json()["info"]["title"] == "garden.Garden"
            continue
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert parts.query.startswith("v="), url  # a new version of the file is a new URL
        again = await client.get(absolute, headers={"if-none-match": asset.headers["etag"]})
        assert again.status_code == 304 and not again.content
    assert kinds == {
        "text/css; charset=utf-8",
        "text/javascript; charset=utf-8",
        "image/png",
        "application/json",
    }
    # Swagger UI 5 or later: 4.x refuses to render an OpenAPI 3.1 document.
    bundle = next(u for u in links.urls if "swagger-ui-bundle.js" in u)
    assert b"isOAS31" in (await client.get(urljoin(str(response.url), bundle))).content


async def test_docs_under_a_prefix_load_from_under_the_prefix() -> None:
    """Mounted (a Starlette Mount, or uvicorn --root-path): the page's relative URLs stay under the prefix."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    server = kubrpc.Server()
    server.register(Garden, GardenImpl())
    app = Starlette(routes=[Mount("/api/v1", app=server.asgi())])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/api/v1/docs")
        assert response.status_code == 200
        links = _Links()
        links.feed(response.text)
        for url in links.urls:
            absolute = urljoin(str(response.url), url)
            assert urlsplit(absolute).path.startswith("/api/v1/"), absolute
            assert (await client.get(absolute)).status_code == 200, absolute
        doc = (await client.get("/api/v1/openapi.json")).json()
        assert doc["servers"] == [{"url": "/api/v1"}]
        # The document's servers + path is where the method really answers.
        call = await client.post(doc["servers"][0]["url"] + "/garden.Garden/count", json={"tree": TREE})
        assert (call.status_code, call.json()) == (200, 2)
    transport = httpx.ASGITransport(app=server.asgi(), root_path="/prefix")  # as uvicorn --root-path sets it
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/prefix/openapi.json")).json()["servers"] == [{"url": "/prefix"}]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.asgi()), base_url="http://t") as client:
        assert "servers" not in (await client.get("/openapi.json")).json()  # not mounted: the default, "/"


async def test_docs_without_the_extra_is_404_saying_what_to_install(
    garden: tuple[httpx.AsyncClient, kubrpc.Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = garden
    monkeypatch.setattr(_docs, "find_assets", lambda: None)
    for path in ("/docs", "/docs/", "/docs/assets/swagger-ui.css"):
        response = await client.get(path)
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"
        assert "`docs` extra" in response.json()["message"] and "swagger-ui-py" in response.json()["message"]
    assert (await client.get("/openapi.json")).status_code == 200  # the document needs nothing extra


async def test_docs_assets_are_only_the_known_files(garden: tuple[httpx.AsyncClient, kubrpc.Server]) -> None:
    client, _ = garden
    for name in ("LICENSE", "swagger-editor.js", "..%2F__init__.py", "%2E%2E", "swagger-ui.js.map"):
        response = await client.get(f"/docs/assets/{name}")
        assert response.status_code == 404, name
    head = await client.head("/docs/assets/swagger-ui.css")
    assert head.status_code == 200 and not head.content and head.headers["content-type"] == "text/css; charset=utf-8"


async def test_info_title_version_and_description_are_configurable() -> None:
    server = kubrpc.Server(openapi=Info(title="Garden API", version="2.1.0", description="Trees, *planted*."))
    server.register(Garden, GardenImpl())
    doc = await _document(server)
    assert doc["info"] == {"title": "Garden API", "version": "2.1.0", "description": "Trees, *planted*."}
    plain = kubrpc.Server()
    plain.register(Garden, GardenImpl())
    assert (await _document(plain))["info"] == {"title": "garden.Garden", "version": kubrpc.__version__}


async def test_docstrings_become_descriptions_and_defaults_are_included(
    garden: tuple[httpx.AsyncClient, kubrpc.Server],
) -> None:
    client, _ = garden
    doc = (await client.get("/openapi.json")).json()
    assert doc["tags"] == [
        {"name": "garden.Garden", "description": "Grows trees.\n\nEach tree is sent back as it was planted."}
    ]
    plant = doc["paths"]["/garden.Garden/plant"]["post"]
    assert plant["summary"] == "Plant a tree."
    assert plant["description"] == "Plant a tree.\n\nThe label names it."
    assert "summary" not in doc["paths"]["/garden.Garden/count"]["post"]  # no docstring, no description
    request = plant["requestBody"]["content"]["application/json"]["schema"]
    assert request["properties"]["label"] == {"type": "string", "default": "x"}
    assert request["properties"]["when"] == {"type": "string", "format": "date", "default": "2024-01-02"}
    assert request["required"] == ["tree"]
    count = doc["paths"]["/garden.Garden/count"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert count["properties"]["deep"] == {"type": "boolean", "default": False}
    assert count["properties"]["mood"] == {"$ref": "#/components/schemas/Mood", "default": "wild"}
    schemas = doc["components"]["schemas"]
    assert schemas["Mood"] == {"enum": ["calm", "wild"], "description": "How a leaf feels."}
    for name in ("Leaf", "Leaf-Input"):
        assert schemas[name]["description"] == "One leaf of a branch."
        assert schemas[name]["properties"]["note"] == {"type": "string", "default": "n"}
        assert schemas[name]["properties"]["mood"] == {"$ref": "#/components/schemas/Mood", "default": "calm"}
        assert schemas[name]["required"] == ["v"]
    assert "description" not in schemas["Branch"]  # no docstring: not the signature dataclasses make up
    assert "default" not in schemas["Tree"]["properties"]["children"]  # a default_factory is not a value
    # The defaults the document states are the ones the server uses: a call without them gets them.
    sent = await client.post("/garden.Garden/count", json={"tree": TREE})
    assert sent.status_code == 200


async def test_document_is_valid_openapi_3_1(garden: tuple[httpx.AsyncClient, kubrpc.Server]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    client, server = garden
    server.openapi = Info(title="t", version="1", description="d")  # read per document
    validator.validate((await client.get("/openapi.json")).json())
    from services import make_server

    full, _ = make_server()
    validator.validate(await _document(full))
    transport = httpx.ASGITransport(app=full.asgi(), root_path="/x")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        validator.validate((await c.get("/x/openapi.json")).json())


def _objects(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The path of every JSON object in `value`, itself included."""
    if isinstance(value, dict):
        yield path
        for k, v in value.items():
            yield from _objects(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _objects(v, (*path, i))


def _with_unknown_key(value: Any, path: tuple[str | int, ...]) -> Any:
    """A copy of `value` whose object at `path` has one more key, valued like a sibling (so only the key is new)."""
    changed = copy.deepcopy(value)
    target = changed
    for step in path:
        target = target[step]
    target["zz_unknown"] = copy.deepcopy(next(iter(target.values()), 1))
    return changed


def _validator(schema: dict[str, Any], doc: dict[str, Any]) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    root = {**schema, "components": doc["components"]}  # resolves "#/components/schemas/..."
    return jsonschema.Draft202012Validator(root)


async def test_additional_properties_agree_with_the_server_at_every_level(
    garden: tuple[httpx.AsyncClient, kubrpc.Server],
) -> None:
    """Each object of a nested request and result, given one unknown key: the schema accepts it exactly
    when the server (arguments) or the client (results) does."""
    client, server = garden
    doc = (await client.get("/openapi.json")).json()
    plant = doc["paths"]["/garden.Garden/plant"]["post"]
    request = _validator(plant["requestBody"]["content"]["application/json"]["schema"], doc)
    result = _validator(plant["responses"]["200"]["content"]["application/json"]["schema"], doc)
    body = {"tree": TREE, "label": "y"}
    assert request.is_valid(body) and result.is_valid(TREE)
    sent = await client.post("/garden.Garden/plant", json=body)
    assert sent.status_code == 200
    returned = sent.json()  # TREE with every default filled in, as the result schema says
    assert returned["root"]["leaves"][0] == {"v": 1, "note": "n", "mood": "calm"} and result.is_valid(returned)

    outcomes = {}
    for path in _objects(body):
        changed = _with_unknown_key(body, path)
        response = await client.post("/garden.Garden/plant", json=changed)
        accepted = response.status_code == 200
        if not accepted:
            assert (response.status_code, response.json()["code"]) == (400, "invalid_argument"), path
        assert accepted == request.is_valid(changed), (path, response.text)
        outcomes[path] = accepted
    assert outcomes[()] is False and outcomes[("tree", "root", "leaves", 0)] is False  # arguments, dataclasses
    assert outcomes[("tree", "root", "by_name")] is True and outcomes[("tree", "extra", "k")] is True  # dicts, Any
    assert outcomes[("tree", "children", 0, "by_name")] is False  # empty dict[str, Leaf]: the added 1 is no Leaf
    assert sum(outcomes.values()) == 4 and len(outcomes) == 15

    method = server.method("garden.Garden/plant")
    assert method is not None
    refused = []
    for path in _objects(returned):
        changed = _with_unknown_key(returned, path)
        try:
            method.decode_result(json.dumps(changed).encode())
            decoded = True
        except kubrpc.RpcError:
            decoded = False
        assert decoded == result.is_valid(changed), path
        if not decoded:
            refused.append(path)
    assert refused == [("children", 0, "by_name")]  # results: a newer server may add fields to any dataclass


async def _document(server: kubrpc.Server) -> dict[str, Any]:
    async with server.serve("http://127.0.0.1:0") as listener, httpx.AsyncClient(base_url=listener.url) as client:
        doc: dict[str, Any] = (await client.get("/openapi.json")).json()
        return doc
