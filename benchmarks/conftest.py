"""Fixtures of the benchmark tests (``python -m pytest benchmarks -m benchmark``).

They read the same variables as the test suite: ``ASYNCFLOW_TEST_POSTGRES_URL`` and
``ASYNCFLOW_TEST_REDIS_URL``; a test that needs a service it was not given is skipped, saying which.
"""

from __future__ import annotations

import os

import pytest

POSTGRES_URL_ENV = "ASYNCFLOW_TEST_POSTGRES_URL"
REDIS_URL_ENV = "ASYNCFLOW_TEST_REDIS_URL"


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    return url


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        pytest.skip(f"{REDIS_URL_ENV} is not set")
    return url
