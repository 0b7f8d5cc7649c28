"""``asyncflow show ID --html FILE``: a self-contained page, checked statically and in headless Chromium
(the DOM after its script ran, and a screenshot whose pixels show the status colours)."""

from __future__ import annotations

import collections
import html
import pathlib
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from asyncflow.cli.graph import STATUS_COLORS

from .cli_helpers import Instances, call_cli, populate

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page(tmp_path: pathlib.Path) -> tuple[pathlib.Path, Instances]:
    url = f"sqlite+aiosqlite:///{tmp_path}/html.db"
    instances = populate(url)
    target = tmp_path / "failed.html"
    result = call_cli("show", str(instances.failed), "--html", str(target), "--db", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {target}" in result.stdout
    return target, instances


def test_page_is_self_contained(page: tuple[pathlib.Path, Instances]) -> None:
    text = page[0].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)\s*=\s*[\"'](https?:)?//", text)  # nothing fetched
    assert "<link" not in text and "@import" not in text
    assert 'data-task-type="manager_approval" data-status="failed"' in text
    assert 'data-task-type="ship_order" data-status="uncreated"' in text
    titles = re.findall(r"<title>(.*?)</title>", text, flags=re.DOTALL)
    hover = html.unescape(next(t for t in titles if t.startswith("Manager approval")))
    assert "too expensive" in hover and '"node_event"' in hover  # the context shows on hover
    names = re.findall(r'<text class="name"[^>]*>(.*?)</text>', text)
    assert "root · 开始节点" in names and "end · 结束节点" in names  # readable without CJK fonts


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip(
            "chromium is not installed and could not be installed (.ci/run runs apt-get install chromium)"
        )
    return found


def _run_chromium(binary: str, profile: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_dom_in_headless_chromium(page: tuple[pathlib.Path, Instances], tmp_path: pathlib.Path) -> None:
    binary = _chromium()
    target, _ = page
    result = _run_chromium(
        binary, tmp_path / "profile", "--dump-dom", f"{target.as_uri()}#node=manager_approval"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    names = re.findall(r'<text class="name"[^>]*>([^<]*)</text>', dom)
    for name in ("Validate order", "Reserve stock", "Charge payment", "Manager approval", "Ship order"):
        assert name in names
    statuses = dict(re.findall(r'data-task-type="(\w+)" data-status="(\w+)"', dom))
    assert statuses["validate_order"] == "completed"
    assert statuses["manager_approval"] == "failed"
    assert statuses["charge_payment"] == "completed"
    assert statuses["ship_order"] == "uncreated"
    # the inline script ran: the node named in the URL is selected and its context is in the panel
    assert 'data-selected="manager_approval"' in dom
    panel = re.search(r'<pre id="panel-body">(.*?)</pre>', dom, flags=re.DOTALL)
    assert panel is not None and "too expensive" in html.unescape(panel.group(1))
    assert re.search(r'class="node status-failed selected"', dom)


def _png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """A minimal PNG decoder (8-bit RGB/RGBA, not interlaced): width, height, channels, rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw, stride, rows = zlib.decompress(idat), width * channels, []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, channels, rows


def test_screenshot_shows_the_status_colours(
    page: tuple[pathlib.Path, Instances], tmp_path: pathlib.Path
) -> None:
    binary = _chromium()
    shot = tmp_path / "shot.png"
    result = _run_chromium(
        binary,
        tmp_path / "profile",
        "--window-size=1200,1000",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        page[0].as_uri(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    width, height, channels, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1000)
    samples: collections.Counter[bytes] = collections.Counter()
    for row in rows[::4]:
        for x in range(0, width * channels, channels * 4):
            samples[row[x : x + 3]] += 1

    def area(hex_color: str) -> int:
        want = bytes.fromhex(hex_color[1:])
        return sum(
            n
            for pixel, n in samples.items()
            if all(abs(p - q) <= 3 for p, q in zip(pixel, want, strict=True))
        )

    # one sample per 16 px²: a node box (210 x 74 px) gives ~970, the legend swatch and badge far fewer
    assert area(STATUS_COLORS["failed"]) > 800  # manager_approval
    assert area(STATUS_COLORS["completed"]) > 4 * 800  # root, validate_order, reserve_stock, charge_payment
