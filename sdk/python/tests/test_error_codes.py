"""Every error code the daemon can return maps to its own exception class with the right status. The codes
are read from the daemon's source (crates/kiln-core/src/error.rs and the HTTP layer's own in
crates/kiln-server/src), so a code added there without a class here fails this test."""

from __future__ import annotations

import re

import kiln
from conftest import REPO
from kiln.errors import _BY_CODE, STATUS_BY_CODE, error_from_code, error_from_response

HTTP_STATUS = {"UNAUTHORIZED": 401, "NOT_FOUND": 404, "METHOD_NOT_ALLOWED": 405, "PAYLOAD_TOO_LARGE": 413}
HTTP_STATUS["TOO_MANY_REQUESTS"] = 429


def daemon_codes() -> dict[str, int]:
    """code -> HTTP status, as the daemon's source defines them."""
    src = (REPO / "crates/kiln-core/src/error.rs").read_text()
    names = dict(re.findall(r"ErrorCode::(\w+) => \"([a-z_]+)\"", src))
    body = src[src.index("fn http_status") :]
    body = body[: body.index("\n    }\n")]
    codes: dict[str, int] = {}
    for arm, status in re.findall(r"((?:\s*\|?\s*ErrorCode::\w+)+)\s*=>\s*(\d{3})", body):
        for variant in re.findall(r"ErrorCode::(\w+)", arm):
            codes[names[variant]] = int(status)
    assert set(codes) == set(names.values()), "every ErrorCode needs an as_str and an http_status arm"
    for path in (REPO / "crates/kiln-server/src").rglob("*.rs"):
        for status, code in re.findall(r"ApiError::new\(\s*[\w:]*StatusCode::(\w+),\s*\"([a-z_]+)\"", path.read_text()):
            assert status in HTTP_STATUS, f"{path}: add StatusCode::{status} to HTTP_STATUS in this test"
            codes[code] = HTTP_STATUS[status]
    return codes


def test_the_parser_finds_the_daemons_codes() -> None:
    codes = daemon_codes()
    assert len(codes) >= 40
    assert codes["process_not_found"] == 404 and codes["rate_limited"] == 429 and codes["route_not_found"] == 404


def test_every_daemon_code_has_its_own_class_and_status() -> None:
    codes = daemon_codes()
    missing = sorted(set(codes) - set(_BY_CODE))
    assert not missing, f"codes without an exception class in kiln/errors.py: {missing}"
    wrong = {c: (STATUS_BY_CODE.get(c), s) for c, s in codes.items() if STATUS_BY_CODE.get(c) != s}
    assert not wrong, f"STATUS_BY_CODE disagrees with the daemon (sdk, daemon): {wrong}"
    classes = [_BY_CODE[c] for c in codes]
    assert len(set(classes)) == len(classes), "two codes share a class"
    for code, status in codes.items():
        for err in (
            error_from_code(code, "why"),
            error_from_response(status, {"error": {"code": code, "message": "why"}}),
        ):
            assert type(err) is _BY_CODE[code] and (err.code, err.status, err.message) == (code, status, "why")
            assert getattr(kiln, type(err).__name__) is type(err), f"{type(err).__name__} is not exported by kiln"
    # Subclasses keep the broad classes callers already catch.
    assert issubclass(kiln.ResourceOverrideRefusedError, kiln.ConflictError)
    assert issubclass(kiln.ProcessNotFoundError, kiln.NotFoundError)
    assert issubclass(kiln.RateLimitedError, kiln.CapacityError)


def test_unknown_code_falls_back_to_status_then_base() -> None:
    e = error_from_response(404, {"error": {"code": "gadget_not_found", "message": "m"}})
    assert type(e) is kiln.NotFoundError and e.code == "gadget_not_found"
    e = error_from_response(503, {"error": {"code": "brand_new", "message": "m"}})
    assert type(e) is kiln.ServerError
    e = error_from_response(418, "not json", "I'm a teapot")
    assert type(e) is kiln.KilnError and (e.code, e.status, e.message) == ("http_418", 418, "I'm a teapot")
