"""The viewer page in headless Chromium against the live service: what it draws is the API's answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pydicom.data import get_testdata_file

from tests.browser.helpers import PHANTOM_SIZE, Corpus

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
expect = sync_api.expect

pytestmark = pytest.mark.browser


@pytest.fixture
def page(browser: Any, service_url: str) -> Any:
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(service_url)
    expect(page.locator("#info")).to_contain_text("index")
    yield page
    assert not page.errors, f"JavaScript errors on the page: {page.errors}"
    page.close()


def load_query(page: Any, path: Path) -> Any:
    page.set_input_files("#query-file", str(path))
    image = page.locator("#query-figure img")
    expect(image).to_be_visible()
    image.evaluate("img => img.decode()")
    return image


def click_at(page: Any, image: Any, xy: tuple[float, float]) -> None:
    box = image.bounding_box()
    scale = box["width"] / float(page.locator("#query-figure").get_attribute("data-width"))
    page.mouse.click(box["x"] + xy[0] * scale, box["y"] + xy[1] * scale)


def marker_xy(marker: Any) -> tuple[float, float]:
    return float(marker.get_attribute("data-x")), float(marker.get_attribute("data-y"))


def test_landmark_matches_are_drawn_as_the_api_answered(
    page: Any, corpus: Corpus, artifacts: Path
) -> None:
    image = load_query(page, corpus.query)
    carina = corpus.query_landmarks["carina"]
    click_at(page, image, carina)
    page.focus("#query-figure")  # a second point by keyboard: cursor starts at the centre
    page.keyboard.press("Shift+ArrowUp")
    page.keyboard.press("Enter")
    expect(page.locator("#points li")).to_have_count(2)
    page.fill("#k", "3")
    page.set_input_files("#target-file", str(corpus.target))
    expect(page.locator("#status")).to_contain_text("Target:")

    page.focus("#k")
    page.keyboard.press("Tab")  # buttons are reachable and work from the keyboard
    assert page.evaluate("document.activeElement.id") == "match-btn"
    with page.expect_response(lambda r: r.url.endswith("/match")) as answer:
        page.keyboard.press("Enter")
    assert answer.value.status == 200
    body = answer.value.json()

    first = body["results"][0]["point"]
    assert abs(first[0] - carina[0]) < 2 and abs(first[1] - carina[1]) < 2
    assert body["results"][1]["point"] == pytest.approx([128, 128 - 5 * PHANTOM_SIZE / 100], abs=0.1)
    for i, result in enumerate(body["results"]):
        check_matches_drawn(page, i, result)
        check_correspondence_drawn(page, i, result["correspondences"][0])

    with page.expect_response(lambda r: r.url.endswith("/heatmap")) as heat:
        page.focus("#heatmap-toggle")
        page.keyboard.press("Space")
    assert heat.value.status == 200
    expect(page.locator('.card.target .figure[data-heatmap="on"]')).to_have_count(1)
    expect(page.locator('.point-result.selected .figure[data-heatmap="on"]')).to_have_count(3)
    with page.expect_response(lambda r: r.url.endswith("/heatmap")):  # select point 1: its maps
        page.focus("#points li:first-child .point-chip")
        page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.getAttribute('aria-pressed')") == "true"  # kept focus
    expect(page.locator('.point-result[data-point="0"] .figure[data-heatmap="on"]')).to_have_count(3)
    expect(page.locator('.point-result[data-point="1"] .figure[data-heatmap="on"]')).to_have_count(0)

    page.wait_for_function("[...document.images].every(img => img.complete && img.naturalWidth > 0)")
    page.screenshot(path=str(artifacts / "viewer.png"), full_page=True)


def check_matches_drawn(page: Any, i: int, result: dict[str, Any]) -> None:
    cards = page.locator(f'.point-result[data-point="{i}"] .card.match')
    expect(cards).to_have_count(len(result["matches"]))
    assert len(result["matches"]) == 3
    for card, match in zip(cards.all(), result["matches"], strict=True):
        assert card.get_attribute("data-image-id") == match["image_id"]
        assert marker_xy(card.locator("g.marker")) == (match["x"], match["y"])
        assert card.locator(".score").inner_text() == f"{match['score']:.3f}"
        thumbnail = card.locator("img")
        assert thumbnail.get_attribute("src") == f"/images/{quote(match['image_id'], safe='')}/thumbnail"
        thumbnail.evaluate("img => img.decode()")  # rejects when the thumbnail does not load


def check_correspondence_drawn(page: Any, i: int, found: dict[str, Any]) -> None:
    marker = page.locator(f'.card.target g.marker[data-point="{i}"]')
    assert marker_xy(marker) == (found["x"], found["y"])
    assert marker.get_attribute("data-mutual") == str(found["mutual"]).lower()
    assert page.locator(".card.target .score").nth(i).inner_text() == f"{found['score']:.3f}"


def test_escape_clears_points_and_api_errors_are_shown(page: Any, corpus: Corpus) -> None:
    image = load_query(page, corpus.query)
    click_at(page, image, (100, 100))
    click_at(page, image, (150, 120))
    expect(page.locator("#points li")).to_have_count(2)
    expect(page.locator("#query-figure g.marker.point")).to_have_count(2)
    page.keyboard.press("Escape")
    expect(page.locator("#points li")).to_have_count(0)
    expect(page.locator("#match-btn")).to_be_disabled()

    page.set_input_files("#target-file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                 "buffer": b"not an image"}])
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("415: image: not a PNG")  # the API's own detail


def test_an_indexed_image_can_be_the_query(page: Any, corpus: Corpus) -> None:
    page.select_option("#query-pick", corpus.indexed[0])
    image = page.locator("#query-figure img")
    expect(image).to_be_visible()
    image.evaluate("img => img.decode()")
    click_at(page, image, (64, 64))  # stored thumbnails are 128 px
    with page.expect_response(lambda r: r.url.endswith("/match")):
        page.click("#match-btn")
    expect(page.locator(".card.match")).to_have_count(5)
    ids = page.locator(".card.match").evaluate_all("cards => cards.map(c => c.dataset.imageId)")
    assert corpus.indexed[0] not in ids  # itself is left out


def test_dicom_query_in_a_narrow_window(page: Any, artifacts: Path) -> None:
    page.set_viewport_size({"width": 760, "height": 900})
    dicom = get_testdata_file("CT_small.dcm")
    assert dicom is not None
    image = load_query(page, Path(dicom))  # shown through /preview: the browser cannot decode DICOM
    expect(page.locator("#query-figure")).to_have_attribute("data-width", "128")
    click_at(page, image, (64, 64))
    page.fill("#k", "2")
    with page.expect_response(lambda r: r.url.endswith("/match")) as answer:
        page.press("#k", "Enter")
    assert answer.value.status == 200
    expect(page.locator(".card.match")).to_have_count(2)
    query_panel = page.locator(".panel").nth(0).bounding_box()
    results_panel = page.locator(".panel.results").bounding_box()
    assert results_panel["y"] >= query_panel["y"] + query_panel["height"]  # one column
    assert results_panel["x"] + results_panel["width"] <= 760  # no sideways scrolling
    page.focus("#match-btn")  # the focus ring shows in the screenshot
    page.screenshot(path=str(artifacts / "viewer-narrow.png"), full_page=True)
