"""Bounded property-based fuzz of the OpenAPI spec over loopback: no input may cause a 5xx.

Every operation of the live /openapi.json gets MAX_EXAMPLES generated requests (schemathesis
strategies driven by hypothesis directly, which keeps this independent of its pytest plugin).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from service.config import Settings
from tests.service.helpers import TEST_DEVICE, block_texture, build_index, png_bytes, running_server

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 15  # per operation: a bounded run


@pytest.mark.slow
def test_no_input_causes_a_server_error(tmp_path: Path, encoder_dir: Path) -> None:
    from schemathesis.checks import not_a_server_error

    root = tmp_path / "index"
    build_index(root, encoder_dir, {"a": png_bytes(block_texture(1, 64, 64))}, tmp_path / "work")
    config = Settings(encoder=encoder_dir, index_root=root, device=TEST_DEVICE, poll_interval_s=0,
                      api_key="fuzz-key", max_upload_bytes=256 * 1024)
    with running_server(config) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert any(op.path == "/match" for op in operations)
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case: schemathesis.Case) -> None:
                response = case.call(timeout=60)
                case.validate_response(response, checks=[not_a_server_error])

            fuzz()
