"""The node's web UI in headless Chromium (Debian's, driven by Playwright): a reviewer's pass.

Log in, open the queue, review a held ultrasound, draw a mask over its burned-in
text, approve it, and find it in the approved list. Screenshots of every step go
to ``test-artifacts/web-ui/``. The page may load nothing from anywhere but the node.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from radfed.synth.site import write_site_corpus
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, NodeProcess, run_cli

pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "test-artifacts" / "web-ui"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt chromium)")
    base = tmp_path_factory.mktemp("web")
    home = base / "home"
    corpus = base / "export"
    write_site_corpus(corpus, patients=1, ct_slices=2, ct_size=64, cr_size=64, with_sr=False)
    run_cli("node", "ingest", str(corpus), "--home", str(home), "-q", check=True)
    secret = base / "password"
    secret.write_text(PASSWORD)
    run_cli(
        "node",
        "user",
        "create",
        "ann",
        "--role",
        "reviewer",
        "--password-file",
        str(secret),
        "--home",
        str(home),
        check=True,
    )
    with NodeProcess(home) as running:
        yield running


def held_ultrasound(home: Path) -> str:
    with sqlite3.connect(home / "index.sqlite") as db:
        row = db.execute(
            "SELECT s.study_uid FROM studies s WHERE s.status = 'held' AND s.modalities LIKE '%US%'"
        ).fetchone()
    assert row is not None, "the ultrasound study should be held for review"
    return str(row[0])


def test_a_reviewer_masks_and_approves_a_held_study(node: NodeProcess) -> None:
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    study_uid = held_ultrasound(node.home)
    foreign: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on(
            "request",
            lambda r: (
                None
                if r.url.startswith(node.url) or r.url.startswith("data:")
                else foreign.append(r.url)
            ),
        )

        # Log in.
        page.goto(f"{node.url}/queue")
        assert "/login" in page.url
        page.fill("#name", "ann")
        page.fill("#password", PASSWORD)
        page.screenshot(path=str(ARTIFACTS / "01-login.png"))
        page.click("#login")
        page.wait_for_selector("#studies")
        page.screenshot(path=str(ARTIFACTS / "02-queue.png"))

        # Open the held ultrasound from the queue.
        page.click(f"tr[data-uid='{study_uid}'] a")
        page.wait_for_selector("#viewer")
        assert "in review" in page.inner_text("#status")
        page.screenshot(path=str(ARTIFACTS / "03-study.png"), full_page=True)

        # Draw a mask over the text banner (the top 30 rows of the 320x240 frame).
        us_row = page.locator(".thumb", has_text="US").first
        us_row.click()
        page.wait_for_selector("#viewer")
        page.keyboard.press("m")
        box = page.locator("#overlay").bounding_box()
        assert box is not None
        scale_x, scale_y = box["width"] / 320, box["height"] / 240
        page.mouse.move(box["x"] + 1, box["y"] + 1)
        page.mouse.down()
        page.mouse.move(box["x"] + 318 * scale_x, box["y"] + 30 * scale_y, steps=5)
        page.mouse.up()
        page.screenshot(path=str(ARTIFACTS / "04-mask-drawn.png"), full_page=True)
        page.click("#mask-apply")
        page.wait_for_selector(".flash")
        assert "Masked" in page.inner_text(".flash")
        page.screenshot(path=str(ARTIFACTS / "05-masked.png"), full_page=True)

        # Approve with a note, then find it among the approved.
        page.fill("#approve-reason", "banner masked, images clean")
        page.click("#approve")
        page.wait_for_load_state()
        page.goto(f"{node.url}/queue?status=approved")
        page.wait_for_selector(f"tr[data-uid='{study_uid}']")
        page.screenshot(path=str(ARTIFACTS / "06-approved-list.png"), full_page=True)
        browser.close()

    assert foreign == []  # nothing from a CDN or anywhere else
    with sqlite3.connect(node.home / "index.sqlite") as db:
        status = db.execute(
            "SELECT status FROM studies WHERE study_uid = ?", (study_uid,)
        ).fetchone()[0]
        masks = db.execute("SELECT rectangles, by FROM masks").fetchall()
        actions = [r[0] for r in db.execute("SELECT action FROM audit_log")]
    assert status == "approved"
    assert masks and masks[0][1] == "ann"
    assert {"login", "mask.apply", "review.approve", "originals.read"} <= set(actions)
    stored = [pydicom.dcmread(p) for p in (node.home / "store").rglob("*.dcm")]
    us = [ds for ds in stored if ds.Modality == "US"]
    assert us and us[0].pixel_array[2:28, 2:300].max() == us[0].pixel_array.min()
    assert us[0].BurnedInAnnotation == "NO"
    for name in (
        "01-login",
        "02-queue",
        "03-study",
        "04-mask-drawn",
        "05-masked",
        "06-approved-list",
    ):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 1000
