"""The viewer's routes over real HTTP: page and assets, indexed images, /preview, /heatmap."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tests.browser.helpers import Corpus


@pytest.fixture(scope="module")
def client(service_url: str) -> httpx.Client:
    return httpx.Client(base_url=service_url, timeout=60)


def test_page_and_assets_are_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for name, kind in [("app.js", "javascript"), ("api.js", "javascript"), ("style.css", "css")]:
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"], name
    assert client.get("/static/..%2Fmain.py").status_code == 404
    assert client.get("/static/nope.js").status_code == 404


def test_indexed_images_are_listed_and_viewable(client: httpx.Client, corpus: Corpus) -> None:
    listing = client.get("/images", params={"limit": 3}).json()
    assert listing["total"] == len(corpus.indexed)
    assert [i["image_id"] for i in listing["images"]] == corpus.indexed[:3]
    # stored as PNG (as index versions before JPEG previews did), made from the source (JPEG)
    for image_id, media in ((corpus.indexed[0], "image/png"), (corpus.unstored_thumbnail, "image/jpeg")):
        info = client.get(f"/images/{quote(image_id, safe='')}").json()
        assert (info["width"], info["height"]) == (256, 256)
        thumb = client.get(info["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == media
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 512


def test_unknown_image_is_a_clear_404(client: httpx.Client) -> None:
    for url in ("/images/nobody", "/images/nobody/thumbnail"):
        answer = client.get(url)
        assert answer.status_code == 404
        assert "'nobody' is not in index version" in answer.json()["detail"]


def test_preview_renders_dicom_with_its_original_size(client: httpx.Client) -> None:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    with open(path, "rb") as fh:
        answer = client.post("/preview", files={"image": ("ct.dcm", fh, "application/dicom")})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert (answer.headers["x-image-width"], answer.headers["x-image-height"]) == ("128", "128")
    assert Image.open(io.BytesIO(answer.content)).size == (128, 128)


def test_preview_of_a_non_image_says_so(client: httpx.Client) -> None:
    answer = client.post("/preview", files={"image": ("notes.txt", b"hello there", "text/plain")})
    assert answer.status_code == 415
    assert "not a PNG, JPEG" in answer.json()["detail"]


def test_heatmap_covers_targets_and_indexed_images(client: httpx.Client, corpus: Corpus) -> None:
    x, y = corpus.query_landmarks["carina"]
    ids = corpus.indexed[:2]
    with open(corpus.query, "rb") as query, open(corpus.target, "rb") as target:
        answer = client.post("/heatmap", files=[("image", query), ("targets", target)],
                             data={"point": json.dumps([x, y]), "image_ids": json.dumps(ids)})
    assert answer.status_code == 200, answer.text
    maps = answer.json()["maps"]
    assert [m["target"] for m in maps] == [0, *ids]
    for heat in maps:
        values = np.array(heat["values"], dtype=float)  # None -> nan on padding
        assert values.shape == (7, 7)
        assert np.nanmax(values) <= 1.0 + 1e-3 and np.nanmin(values) >= -1.0 - 1e-3
        assert heat["extent"] == pytest.approx([0, 0, 256, 256], abs=1e-6)  # square: no padding


def test_heatmap_rejects_bad_points(client: httpx.Client, corpus: Corpus) -> None:
    for point, message in [("[1]", "`point` must be"), ("[1, NaN]", "`point` must be"),
                           (f"[1{'0' * 400}, 5]", "`point` must be"), ("[" * 100_000, "`point` must be"),
                           ("[9999, 5]", "outside the query image")]:
        with open(corpus.query, "rb") as query:
            answer = client.post("/heatmap", files={"image": query}, data={"point": point})
        assert answer.status_code == 422 and message in answer.json()["detail"], point
