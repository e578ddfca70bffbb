"""Damaged uploads over HTTP: a bounded sample of the decoder fuzz corpus (tests/decode_fuzz_corpus.py)
posted to POST /match and POST /preview of a live service never gets a 5xx; a refusal (4xx) is JSON
with a `detail` that says what was wrong."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from service.config import Settings
from tests.decode_fuzz_corpus import MAX_PIXELS, fuzz_case
from tests.service.helpers import running_server

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom and Pillow warn about every odd element

SAMPLE = range(7, 3000, 30)  # 100 of the unit fuzz's cases, spread over every corpus file
ROUTES = {"/match": {"points": "[[1, 1]]"}, "/preview": {}}


def refusal_problem(response: httpx.Response) -> str | None:
    """What is wrong with the answer to a damaged upload, or None."""
    if response.status_code >= 500:
        return f"status {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            return f"status {response.status_code} without a JSON body: {response.text[:300]}"
        if not isinstance(body, dict) or not body.get("detail"):
            return f"status {response.status_code} without a detail: {response.text[:300]}"
    return None


@pytest.mark.slow
def test_damaged_uploads_never_get_a_server_error(settings_for: Callable[..., Settings]) -> None:
    failures, statuses = [], set()
    settings = settings_for(max_pixels=MAX_PIXELS)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        for index in SAMPLE:
            case = fuzz_case(index)
            for route, form in ROUTES.items():
                files = [("image", ("upload", case.data, "application/octet-stream"))]
                response = http.post(route, files=files, data=form)
                statuses.add(response.status_code)
                if problem := refusal_problem(response):
                    failures.append(f"POST {route} {case.describe()}: {problem}")
        assert http.get("/health").status_code == 200  # and the service still answers
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:20])
    assert 200 in statuses and statuses & {415, 422}, statuses  # the sample has decodable and refused files
