"""The web page's Batches view in a real browser (Debian's chromium via Playwright, as for the job
page) against a real API server whose launcher runs each file of a batch as its own job.

A batch fills in live on the list and on its own page (the done count rises through intermediate
values to the total), its corrupt file shows failed with its error, every file links to its job,
the summary downloads with the page's token; *Retry failed files* re-runs only the failed file;
a second run of the same batch names the job each file reused; *Cancel batch* (from the keyboard)
stops a running batch.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.batch_helpers import calls, file_work, make_images, wait_batch
from tests.test_api import test_web_page
from tests.test_api.test_web_page import LONG, WatchedPage, _screenshot

pytestmark = pytest.mark.browser

# The job page's browser fixtures: Debian's chromium, pages watched for script errors and requests
# to another origin.
browser = test_web_page.browser
open_page = test_web_page.open_page

#: Records every value the batch's "files done" bar took (list row or batch page), installed before
#: the page's own scripts.
DONE_LOG = """
window.__doneLog = [];
new MutationObserver(() => {
  const bar = document.querySelector('#batch-progress progress, #batches-table progress');
  if (!bar) return;
  const done = Number(bar.dataset.done);
  const log = window.__doneLog;
  if (log[log.length - 1] !== done) log.push(done);
}).observe(document, { subtree: true, childList: true, attributes: true });
"""


def _media_api(api_factory: Any, tmp_path: Path) -> tuple[Any, Path]:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return api_factory(media_input_roots=[incoming], max_concurrent_jobs=4), incoming


def _open(open_page: Callable[[str], WatchedPage], api: Any, route: str) -> Any:
    page = open_page(api.url).page
    page.add_init_script(DONE_LOG)
    page.goto(route)
    return page


def test_a_batch_fills_in_live_and_its_failed_file_is_retried_from_the_page(
    api_factory: Any, open_page: Callable[[str], WatchedPage], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    api, incoming = _media_api(api_factory, tmp_path)
    names = make_images(incoming, 6, corrupt=1)
    log = tmp_path / "calls.log"
    listing = _open(open_page, api, "/ui#/batches")
    expect(listing.locator("#batches-count")).to_have_text("No batches yet.")
    expect(listing.locator("#connection")).to_have_text("Live")

    client = api.client()
    body = {
        "name": "web nightly",
        "pipeline": file_work(log, seconds=0.7),
        "folder": str(incoming),
        "max_concurrency": 2,
    }
    batch_id = client.post("/v1/batches", json=body).json()["batch_id"]
    detail = _open(open_page, api, f"/ui#/batches/{batch_id}")
    row = listing.locator(f'#batches-table tr[data-batch-id="{batch_id}"]')
    expect(row).to_have_attribute("data-status", "failed", timeout=LONG)  # appeared live, then ended
    expect(detail.locator("#batch-status")).to_have_text("failed", timeout=LONG)

    total = len(names)
    for page in (listing, detail):
        done = page.evaluate("window.__doneLog")
        assert done[-1] == total and done == sorted(done), done  # it only moved forward, to the end
        assert len({d for d in done if 0 < d < total}) >= 2, done  # through values in between
    expect(row.locator(".succeeded")).to_have_text("6")
    expect(row.locator(".failed")).to_have_text("1")
    expect(row.locator(".rate")).to_contain_text("files/s")
    expect(detail.locator("#batch-counts")).to_have_text("6 succeeded (0 reused), 1 failed, 0 crashed, 0 cancelled")

    batch = client.get(f"/v1/batches/{batch_id}").json()
    for file in batch["files"]:  # each file shows its status and links to its job's page
        file_row = detail.locator(f'#batch-files tr[data-name="{file["name"]}"]')
        expect(file_row).to_have_attribute("data-status", file["status"])
        link = file_row.locator(".job a")
        expect(link).to_have_text(file["job_id"])
        expect(link).to_have_attribute("href", f"#/jobs/{file['job_id']}")
    bad_row = detail.locator('#batch-files tr[data-name="bad-0.png"]')
    expect(bad_row).to_have_attribute("data-status", "failed")
    expect(bad_row.locator(".file-error")).to_contain_text("MediaError")
    _screenshot(listing, "batches.png")
    _screenshot(detail, "batch.png")

    # The summary downloads with the page's token: one row per file.
    with detail.expect_download() as downloaded:
        detail.get_by_role("link", name="CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(downloaded.value.path()).read_text())))
    assert [r["name"] for r in rows] == names
    with detail.expect_download() as downloaded:
        detail.get_by_role("link", name="Parquet").click()
    assert Path(downloaded.value.path()).read_bytes()[:4] == b"PAR1"

    # Retry failed: only the corrupt file gets a new job (and fails again: its bytes are corrupt).
    expect(detail.get_by_role("button", name="Cancel batch")).to_be_hidden()
    assert calls(log) == 6
    detail.get_by_role("button", name="Retry failed files").click()
    expect(bad_row.locator(".job a")).to_have_text(re.compile(r"-a2$"), timeout=LONG)
    expect(detail.locator("#batch-status")).to_have_text("failed", timeout=LONG)
    expect(bad_row).to_have_attribute("data-status", "failed")
    retried = client.get(f"/v1/batches/{batch_id}").json()
    before = {f["name"]: f["job_id"] for f in batch["files"]}
    after = {f["name"]: f for f in retried["files"]}
    assert {n: f["job_id"] for n, f in after.items() if n != "bad-0.png"} == {
        n: j for n, j in before.items() if n != "bad-0.png"
    }
    assert after["bad-0.png"]["attempts"] == 2 and after["bad-0.png"]["job_id"] != before["bad-0.png"]
    assert calls(log) == 6  # no good file ran again

    # A file's link opens its job, whose page links back to the batch.
    detail.locator('#batch-files tr[data-name="img-00.png"] .job a').click()
    expect(detail.locator("h1")).to_contain_text(before["img-00.png"])
    detail.get_by_role("link", name=batch_id).click()
    expect(detail.locator("h1")).to_contain_text("web nightly")
    row.get_by_role("link", name="web nightly").click()
    expect(listing.locator("#batch-status")).to_have_text("failed")

    # The same batch again: every good file takes its earlier job's result, and its row names that job.
    again = client.post("/v1/batches", json=body).json()["batch_id"]
    listing.goto(f"/ui#/batches/{again}")
    expect(listing.locator("#batch-status")).to_have_text("failed", timeout=LONG)
    expect(listing.locator("#batch-counts")).to_contain_text("6 succeeded (6 reused)")
    reused = listing.locator('#batch-files tr[data-name="img-00.png"] .reused a')
    expect(reused).to_have_text(before["img-00.png"])
    expect(reused).to_have_attribute("href", f"#/jobs/{before['img-00.png']}")
    expect(listing.locator('#batch-files tr[data-name="bad-0.png"] .reused')).to_have_count(0)
    assert calls(log) == 6


def test_a_running_batch_is_cancelled_from_its_page_with_the_keyboard(
    api_factory: Any, open_page: Callable[[str], WatchedPage], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    api, incoming = _media_api(api_factory, tmp_path)
    make_images(incoming, 4)
    client = api.client()
    body = {"pipeline": file_work(tmp_path / "calls.log", seconds=30), "folder": str(incoming), "max_concurrency": 2}
    batch_id = client.post("/v1/batches", json=body).json()["batch_id"]
    page = _open(open_page, api, f"/ui#/batches/{batch_id}")
    expect(page.locator("#batch-progress")).to_contain_text("(2 queued, 2 running)", timeout=LONG)
    expect(page.locator('#batch-files tr[data-status="running"]')).to_have_count(2)
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('main input, main select, main button, main progress')]
              .filter((el) => !((el.labels && el.labels.length) || el.getAttribute('aria-label')
                                || (el.tagName === 'BUTTON' && el.textContent.trim())))
              .map((el) => el.outerHTML)"""
    )
    assert unnamed == []
    expect(page.get_by_role("button", name="Retry failed files")).to_be_hidden()

    cancel = page.get_by_role("button", name="Cancel batch")
    cancel.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#batch-status")).to_have_text("cancelled", timeout=LONG)
    expect(page.locator('#batch-files tr[data-status="cancelled"]')).to_have_count(4)
    expect(cancel).to_be_hidden()
    expect(page.get_by_role("button", name="Retry failed files")).to_be_visible()  # cancelled files may run again
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "cancelled" and batch["counts"]["cancelled"] == 4 and batch["counts"]["succeeded"] == 0
    started = [f for f in batch["files"] if client.get(f"/v1/jobs/{f['job_id']}").json()["started_at"]]
    assert len(started) == 2  # the queued files never started


def test_the_batches_list_reads_again_what_it_missed_while_disconnected(
    api_factory: Any, open_page: Callable[[str], WatchedPage], tmp_path: Path
) -> None:
    """``batch_progress`` is live only (not replayed): a page that missed a whole batch on a dropped
    connection shows it, ended, once it reconnects (it reads the list again on every connect)."""
    from playwright.sync_api import expect

    api, incoming = _media_api(api_factory, tmp_path)
    make_images(incoming, 3)
    sockets: list[Any] = []

    def deaf_to_batches_at_first(route: Any) -> None:
        """The page's first connection to the all-jobs stream hears no ``batch_progress``."""
        server = route.connect_to_server()
        deaf = not sockets
        route.on_message(server.send)
        server.on_message(lambda m: None if deaf and '"batch_progress"' in str(m) else route.send(m))
        sockets.append(route)

    page = open_page(api.url).page
    page.route_web_socket(re.compile(r"/v1/ws/jobs(\?|$)"), deaf_to_batches_at_first)
    page.goto("/ui#/batches")
    expect(page.locator("#batches-count")).to_have_text("No batches yet.")
    expect(page.locator("#connection")).to_have_text("Live")
    client = api.client()
    body = {"name": "missed", "pipeline": file_work(tmp_path / "calls.log"), "folder": str(incoming)}
    batch = wait_batch(client, client.post("/v1/batches", json=body).json()["batch_id"])
    assert batch["status"] == "succeeded"
    expect(page.locator("#batches-table tbody tr")).to_have_count(0)  # it heard nothing of it

    sockets[0].close()  # the connection drops; the page reconnects
    row = page.locator(f'#batches-table tr[data-batch-id="{batch["batch_id"]}"]')
    expect(row).to_have_attribute("data-status", "succeeded", timeout=LONG)
    expect(row.locator(".done")).to_have_text(" 3/3")
    expect(page.locator("#connection")).to_have_text("Live")
    assert len(sockets) == 2


def test_a_read_token_sees_a_batch_and_its_summary_but_no_cancel(
    api_factory: Any, open_page: Callable[[str], WatchedPage], tmp_path: Path
) -> None:
    """With tokens, the batch page reads and downloads with the tab's token; Cancel and Retry are
    offered only to a token that may ``run``."""
    import httpx
    from playwright.sync_api import expect

    from tests.test_api.test_api_access import bearer, write_tokens
    from tests.test_api.test_web_page import _sign_in

    incoming = tmp_path / "incoming"
    names = make_images(incoming, 2)
    tokens = {"reader": ("batch-reader", ["read"]), "runner": ("batch-runner", ["read", "run"])}
    api = api_factory(
        launch_jobs=False, media_input_roots=[incoming], api_tokens_file=write_tokens(tmp_path / "tokens.json", tokens)
    )
    http = httpx.Client(base_url=api.url, headers=bearer("batch-runner"), timeout=30)
    body = {"name": "guarded", "pipeline": file_work(tmp_path / "calls.log"), "folder": str(incoming)}
    batch_id = http.post("/v1/batches", json=body).json()["batch_id"]  # stays running: nothing launches

    reader = open_page(api.url).page
    reader.goto(f"/ui#/batches/{batch_id}")
    _sign_in(reader, "batch-reader")
    expect(reader.locator("#batch-status")).to_have_text("running")
    expect(reader.locator("#batch-files tbody tr")).to_have_count(2)
    expect(reader.get_by_role("button", name="Cancel batch")).to_be_hidden()
    with reader.expect_download() as downloaded:
        reader.get_by_role("link", name="CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(downloaded.value.path()).read_text())))
    assert [r["name"] for r in rows] == names
    reader.get_by_role("link", name="Batches", exact=True).click()
    expect(reader.locator(f'#batches-table tr[data-batch-id="{batch_id}"]')).to_contain_text("runner")

    runner = open_page(api.url).page
    runner.goto(f"/ui#/batches/{batch_id}")
    _sign_in(runner, "batch-runner")
    expect(runner.get_by_role("button", name="Cancel batch")).to_be_visible()
