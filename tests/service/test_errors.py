"""Every bad input gets its 4xx with a JSON `detail`, and the service keeps working afterwards."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.config import Settings
from tests.service.helpers import TEST_DEVICE, block_texture, build_index, png_bytes, running_server

API_KEY = "s3cret-key"
IMAGE = png_bytes(block_texture(5, 96, 80))  # 80 x 96 pixels


def multiframe_dicom(frames: int = 2) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = 8, 8, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((frames, 8, 8), np.uint8).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("index")
    build_index(root, encoder_dir, {"known": IMAGE}, root.parent / "work")
    settings = Settings(encoder=encoder_dir, index_root=root, device=TEST_DEVICE, poll_interval_s=0,
                        api_key=API_KEY, max_points=4, max_targets=2, max_k=10, max_image_ids=3,
                        max_upload_bytes=64 * 1024, max_pixels=1_000_000)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def post(client: httpx.Client, image: bytes = IMAGE, targets: tuple[bytes, ...] = (),
         **data: str) -> httpx.Response:
    files = [("image", ("q", image, "application/octet-stream"))]
    files += [("targets", (f"t{i}", t, "application/octet-stream")) for i, t in enumerate(targets)]
    return client.post("/match", files=files, data=data or {"points": "[[10, 10]]"})


BIG_PNG = png_bytes(np.random.default_rng(0).random((2000, 1000)))  # ~2 MB of noise, 2M pixels


def float_tiff_with_nan() -> bytes:
    values = np.linspace(0, 1, 96 * 96, dtype=np.float32).reshape(96, 96)
    values[5, 5] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


BAD_REQUESTS = {
    "not an image": (415, {"image": b"hello, I am plain text" * 10}),
    "empty file": (415, {"image": b""}),
    "truncated png": (422, {"image": IMAGE[: len(IMAGE) // 2]}),
    "multi-frame dicom": (422, {"image": multiframe_dicom()}),
    "NaN pixels in a float TIFF": (422, {"image": float_tiff_with_nan()}),
    "too many bytes": (413, {"image": BIG_PNG}),
    "too many bytes in targets": (413, {"targets": (BIG_PNG[: 40_000], BIG_PNG[40_000:80_000])}),
    "bad target": (415, {"targets": (b"not an image",)}),
    "too many targets": (422, {"targets": (IMAGE, IMAGE, IMAGE)}),
    "too many points": (422, {"points": "[[1,1],[2,2],[3,3],[4,4],[5,5]]"}),
    "point left of the image": (422, {"points": "[[-0.5, 10]]"}),
    "point below the image": (422, {"points": "[[10, 96.5]]"}),
    "NaN coordinate": (422, {"points": "[[NaN, 10]]"}),
    "infinite coordinate": (422, {"points": "[[1e999, 10]]"}),
    "malformed points JSON": (422, {"points": "[[10, 10"}),
    "huge integer coordinate": (422, {"points": f"[[{10**400}, 10]]"}),
    "too many digits": (422, {"points": f"[[{'9' * 5000}, 10]]"}),
    "deeply nested points": (422, {"points": "[" * 20_000 + "]" * 20_000}),
    "deeply nested image_ids": (422, {"points": "[[1, 1]]", "image_ids": "[" * 20_000 + "]" * 20_000}),
    "points not pairs": (422, {"points": "[[10, 10, 10]]"}),
    "points not numbers": (422, {"points": '[["a", 10]]'}),
    "empty points": (422, {"points": "[]"}),
    "both points and boxes": (422, {"points": "[[1, 1]]", "boxes": "[[1, 1, 5, 5]]"}),
    "neither points nor boxes": (422, {"k": "3"}),
    "inverted box": (422, {"boxes": "[[50, 50, 10, 10]]"}),
    "box outside": (422, {"boxes": "[[10, 10, 500, 50]]"}),
    "malformed boxes JSON": (422, {"boxes": "{}"}),
    "unknown image id": (422, {"points": "[[10, 10]]", "image_ids": '["known", "nope"]'}),
    "image_ids not strings": (422, {"points": "[[10, 10]]", "image_ids": "[1, 2]"}),
    "malformed image_ids": (422, {"points": "[[10, 10]]", "image_ids": "known"}),
    "too many image_ids": (422, {"points": "[[10, 10]]", "image_ids": '["a", "b", "c", "d"]'}),
    "k zero": (422, {"points": "[[10, 10]]", "k": "0"}),
    "k too large": (422, {"points": "[[10, 10]]", "k": "11"}),
    "k not a number": (422, {"points": "[[10, 10]]", "k": "five"}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_its_status_and_a_detail(client: httpx.Client, case: str) -> None:
    status, fields = BAD_REQUESTS[case]
    image = fields.get("image", IMAGE)
    targets = fields.get("targets", ())
    data = {k: v for k, v in fields.items() if isinstance(v, str)}
    response = post(client, image, targets, **data)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_missing_image_field_is_422(client: httpx.Client) -> None:
    response = client.post("/match", data={"points": "[[1, 1]]"})
    assert response.status_code == 422 and response.json()["detail"]


def test_decompression_bomb_is_413(client: httpx.Client) -> None:
    bomb = png_bytes(np.zeros((1500, 1000)))  # 1.5 M pixels, tiny file
    response = post(client, bomb)
    assert response.status_code == 413 and "pixels" in response.json()["detail"]


def test_service_still_works_after_bad_input(client: httpx.Client) -> None:
    before = client.get("/info").json()
    post(client, b"garbage")
    post(client, points="[[NaN, 1]]")
    response = post(client, image_ids='["known"]', points="[[40, 40]]")
    assert response.status_code == 200, response.text
    assert client.get("/info").json() == before


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                                     {"X-API-Key": API_KEY[:-1]}, {"X-API-Key": API_KEY + "x"}])
def test_admin_refuses_missing_or_wrong_key(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.post("/admin/reload", headers=headers)
    assert response.status_code == 401 and "API key" in response.json()["detail"]


@pytest.mark.parametrize("headers", [{"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}])
def test_admin_accepts_the_key(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.post("/admin/reload", headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "unchanged"


def test_body_limit_holds_without_content_length(client: httpx.Client) -> None:
    """A chunked upload has no Content-Length: the limit is enforced on the bytes as they arrive."""
    boundary = "ace-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="points"\r\n\r\n[[1, 1]]\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for start in range(0, len(BIG_PNG), 16_384):
            yield BIG_PNG[start : start + 16_384]
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/match", content=chunks(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "ACE_MAX_UPLOAD_BYTES" in response.json()["detail"]


def test_a_queue_too_small_for_a_request_with_its_second_looks_is_refused(encoder_dir: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"at least \(1 \+ ACE_MAX_TARGETS\) x 3 = 12"):
        Settings(encoder=encoder_dir, queue_size=11, max_targets=3)
    Settings(encoder=encoder_dir, queue_size=11, max_targets=3, max_look=2)  # 4 x 2 = 8 fits


def test_max_look_comes_from_the_environment_and_bad_values_are_named(
        encoder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("ACE_MAX_LOOK", "1")
    assert Settings(encoder=encoder_dir).max_look == 1
    monkeypatch.setenv("ACE_MAX_LOOK", "3")
    with pytest.raises(ValidationError, match="ACE_MAX_LOOK must be 1"):
        Settings(encoder=encoder_dir)


def test_looks_are_prepared_only_for_sizes_a_pair_shares() -> None:
    from ace_model.encoder import Encoder, EncoderSpec
    from ace_model.preprocess import DecodedImage, decode_image
    from service.routes.match import _add_looks, _prepare

    encoder = Encoder(EncoderSpec("ace_dense_pyramid", 64))
    def upload(side: int) -> bytes:
        return png_bytes(block_texture(side, side, side))

    big, small = _prepare(decode_image(upload(300)), encoder), _prepare(decode_image(upload(64)), encoder)
    assert isinstance(big.image, DecodedImage)
    alone, _ = _add_looks(big, [], encoder, 4)
    assert alone.looks == ()  # no target: nothing would use a look
    query, targets = _add_looks(big, [small, big], encoder, 4)
    assert [c.size for _, c in query.looks] == [128, 256]
    assert [[c.size for _, c in t.looks] for t in targets] == [[], [128, 256]]
    assert _add_looks(big, [big], encoder, 2)[0].looks[-1][1].size == 128
