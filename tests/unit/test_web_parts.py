"""The dashboard's pure parts: filter parsing and links, and the CSRF signer."""

from __future__ import annotations

import pytest

from asyncflow.errors import ParamInvalidError
from asyncflow.web._data import ListFilters
from asyncflow.web._security import CsrfSigner


def test_filters_parse_and_round_trip() -> None:
    f = ListFilters.parse(
        {"type": ["a, b", "a"], "status": ["failed"], "business_id": [" x&y "], "page": ["3"]}
    )
    assert f == ListFilters(types=("a", "b"), statuses=("failed",), business_id="x&y", page=3)
    assert f.query() == "type=a&type=b&status=failed&business_id=x%26y&page=3"
    assert f.query(page=1, statuses=()) == "type=a&type=b&business_id=x%26y"
    params = f.params()
    assert params.order_by_id_asc is False and params.page.page == 3 and params.page.size == 20
    assert ListFilters.parse({}) == ListFilters()


@pytest.mark.parametrize(
    "query",
    [{"status": ["done"]}, {"page": ["0"]}, {"page": ["x"]}, {"size": ["201"]}, {"business_id": ["a\x00"]}],
    ids=["status", "page-0", "page-text", "size", "nul"],
)
def test_bad_filters_are_refused(query: dict[str, list[str]]) -> None:
    with pytest.raises(ParamInvalidError):
        ListFilters.parse(query)


def test_csrf_signer() -> None:
    signer = CsrfSigner(b"k" * 32)
    token, cookie = signer.new_cookie()
    assert signer.token_of(cookie) == token
    assert signer.check(cookie, token)
    assert not signer.check(cookie, token + "x")
    assert not signer.check(cookie, None)
    assert not signer.check(None, token)
    assert not signer.check(token + "." + "0" * 64, token)  # a forged signature
    assert not CsrfSigner(b"other key").check(cookie, token)  # another app's cookie
    assert signer.new_cookie()[0] != token


def test_csrf_signer_refuses_non_ascii_instead_of_raising() -> None:
    signer = CsrfSigner(b"k" * 32)
    token, cookie = signer.new_cookie()
    assert signer.token_of(token + ".\u00e9" * 64) is None  # a cookie the browser sent as latin-1
    assert not signer.check(cookie, "\u00e9" + token)  # a form field with a non-ASCII character
