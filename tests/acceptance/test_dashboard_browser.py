"""The dashboard in a real headless Chromium (selenium + Debian's chromium-driver), served by uvicorn.

List, filter, open an instance, act with and without authorization, watch an instance complete
(the page reloads itself; the browser never navigates), and after every test: no console errors and
no request that left the app. Screenshots go to the test's tmp dir. In CI (``CI=true``) a missing
browser fails these tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .cli_helpers import cli_env
from .dashboard_helpers import DB_ENV, EVIL, Seeded, free_port, seed

pytestmark = pytest.mark.timeout(120)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]


def _need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        message = f"{binary} is not installed (.ci/run installs chromium and chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class Server:
    origin: str  # http://127.0.0.1:PORT
    base: str  # origin + /wf
    ids: Seeded
    db: str


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[Server]:
    db = f"sqlite+aiosqlite:///{tmp_path}/browser.db"
    ids = asyncio.run(seed(db))
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.acceptance.dashboard_helpers:make_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        command,
        cwd=pathlib.Path(__file__).resolve().parents[2],
        env=cli_env(**{DB_ENV: db}),
        stdout=log,
        stderr=log,
    )
    origin = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{origin}/wf/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.1)
        yield Server(origin, f"{origin}/wf", ids, db)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _driver(tmp_path: pathlib.Path, *, javascript: bool) -> Any:
    binary = _need("chromium")
    driver_path = _need("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


_INTERNAL = ("chrome://", "chrome-untrusted://", "about:")


class Browser:
    """A selenium driver plus the checks every test ends with."""

    def __init__(self, driver: Any, server: Server, shots: pathlib.Path) -> None:
        self.driver = driver
        self.server = server
        self.shots = shots
        self.requests: list[str] = []
        self.console: list[dict[str, Any]] = []

    def get(self, path: str) -> None:
        self.driver.get(self.server.base + path)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def shot(self, name: str) -> pathlib.Path:
        path = self.shots / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), path
        assert path.stat().st_size > 1000
        return path

    def wait_for(self, check: Any, timeout: float = 30) -> None:
        """Poll ``check`` until true; a page that reloads itself between finding an element and
        reading it (the live refresh) makes that one poll false, not an error."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (StaleElementReferenceException, NoSuchElementException):
                pass
            assert time.monotonic() < deadline, "timed out waiting in the browser"
            time.sleep(0.2)

    def clicks(self, *selectors: str) -> None:
        """Click ``selectors`` in order; from the first again when the live refresh reloaded the page
        in between (a stale element, or a ``details`` closed again by the reload)."""
        from selenium.common.exceptions import ElementNotInteractableException

        def attempt() -> bool:
            try:
                for selector in selectors:
                    self.css(selector).click()
            except ElementNotInteractableException:
                return False
            return True

        self.wait_for(attempt)

    def collect(self) -> None:
        """Read the console and the network (performance) logs gathered since the last call."""
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                params = message["params"]
                # the browser's own start tab (chrome://new-tab-page...) loads things of its own: skip them
                if not params.get("documentURL", "").startswith(_INTERNAL):
                    self.requests.append(params["request"]["url"])

    def assert_clean(self, allowed_console: tuple[str, ...] = ()) -> None:
        self.collect()
        errors = [
            e
            for e in self.console
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed_console)
        ]
        assert errors == [], errors
        assert self.requests, "the performance log recorded no request"
        assert any(url.startswith(self.server.base) for url in self.requests)
        outside = [url for url in self.requests if not url.startswith(self.server.origin + "/")]
        assert outside == [], outside


@pytest.fixture
def browser(server: Server, tmp_path: pathlib.Path) -> Iterator[Browser]:
    driver = _driver(tmp_path, javascript=True)
    try:
        yield Browser(driver, server, tmp_path)
    finally:
        driver.quit()


def test_list_filter_and_open_an_instance_without_javascript(server: Server, tmp_path: pathlib.Path) -> None:
    from selenium.webdriver.support.ui import Select

    driver = _driver(tmp_path, javascript=False)  # reading needs no script
    b = Browser(driver, server, tmp_path)
    try:
        b.get("/")
        ids = server.ids
        rows = [int(r.get_attribute("data-id")) for r in b.all("#instances tbody tr[data-id]")]
        assert rows == sorted([ids.waiting, ids.failed, ids.evil, *ids.others], reverse=True)
        assert b.css("#count-all").text == "all 6"
        # the stylesheet (from the app) applied: the failed badge has its status colour
        assert (
            b.css("#count-failed .badge").value_of_css_property("background-color")
            == "rgba(252, 165, 165, 1)"
        )
        evil_row = b.css(f'tr[data-id="{ids.evil}"]')
        assert EVIL in evil_row.text  # shown as text, not run
        b.shot("list")

        Select(b.css('select[name="status"]')).select_by_value("failed")
        b.css('form.filters button[type="submit"]').click()
        b.wait_for(lambda: "status=failed" in driver.current_url)
        assert [int(r.get_attribute("data-id")) for r in b.all("#instances tbody tr[data-id]")] == [
            ids.failed
        ]
        b.shot("filtered")

        b.css(f'a[href="/wf/instances/{ids.failed}"]').click()
        b.wait_for(lambda: driver.current_url.endswith(f"/wf/instances/{ids.failed}"))
        assert b.css("#instance-status").get_attribute("data-status") == "failed"
        node = b.css('#dag g.node[data-task-type="explode"]')
        assert node.get_attribute("data-status") == "failed"
        assert b.css('#dag g.node[data-task-type="explode"] rect').get_attribute("fill") == "#fca5a5"
        details = b.css('details[data-task-type="explode"]')
        assert details.get_attribute("open") is None
        b.css('a[href="#node-1"]').click()  # the node's details open, without script
        b.wait_for(lambda: details.get_attribute("open") is not None)
        assert "boom " + EVIL in details.text  # visible text now
        assert b.all("meta[http-equiv='refresh']") == []  # over: no reloads
        b.shot("instance-failed")

        b.get(f"/instances/{ids.evil}")
        assert b.css("#workflow-context").get_attribute("textContent").count(EVIL) == 1
        assert driver.title.startswith("approval #")
        b.assert_clean()
    finally:
        driver.quit()


def test_watch_an_instance_complete_after_an_authorized_event(browser: Browser) -> None:
    b, ids = browser, browser.server.ids
    driver = b.driver
    b.get(f"/instances/{ids.waiting}")
    assert b.css("#instance-status").get_attribute("data-status") == "running"
    assert b.css('#dag g.node[data-task-type="approve"]').get_attribute("data-status") == "pending"
    assert b.all("#live")

    # not authorized (no operator cookie): the confirmation is refused and nothing changes
    b.get(f"/instances/{ids.waiting}/event?node=approve")
    assert "not allowed to send event" in b.css("#error").text
    b.shot("refused")
    b.collect()
    b.console = [e for e in b.console if "status of 403" not in e["message"]]  # the refusal itself

    driver.add_cookie({"name": "operator", "value": "yes", "path": "/"})
    b.get(f"/instances/{ids.waiting}")
    # two clicks on a page that reloads itself: a reload between them is clicked through again
    b.clicks('details[data-task-type="approve"] summary', 'details[data-task-type="approve"] a.event')
    b.wait_for(lambda: "/event?node=approve" in driver.current_url)
    b.css("#event_content").send_keys('{"ok": true}')
    b.shot("confirm-event")
    b.css("#confirm").click()
    b.wait_for(lambda: "done=event" in driver.current_url)
    assert "event was stored" in b.css("#done").text

    # the driver in the server finishes it; the page reloads itself until it shows it
    before = driver.current_url
    b.wait_for(lambda: b.css("#instance-status").get_attribute("data-status") == "completed", timeout=30)
    assert driver.current_url == before
    assert b.css('#dag g.node[data-task-type="approve"]').get_attribute("data-status") == "completed"
    assert b.all("#live") == []
    b.shot("completed")
    b.assert_clean()


def test_cancel_with_and_without_authorization(browser: Browser) -> None:
    b, ids = browser, browser.server.ids
    driver = b.driver
    target = ids.others[0]
    b.get(f"/instances/{target}")
    b.css("#cancel").click()
    assert "not allowed to cancel" in b.css("#error").text
    b.collect()
    b.console = [e for e in b.console if "status of 403" not in e["message"]]
    b.get(f"/instances/{target}")
    assert b.css("#instance-status").get_attribute("data-status") == "running"

    driver.add_cookie({"name": "operator", "value": "yes", "path": "/"})
    b.css("#cancel").click()
    b.wait_for(lambda: driver.current_url.endswith(f"/instances/{target}/cancel"))
    assert "Cancel instance #" in b.css("main").text
    b.css("#confirm").click()
    b.wait_for(lambda: "done=cancel" in driver.current_url)
    assert b.css("#instance-status").get_attribute("data-status") == "canceled"
    b.shot("canceled")
    b.assert_clean()
