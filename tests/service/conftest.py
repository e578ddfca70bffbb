"""Fixtures for the service tests (the helpers they use are in tests/service/helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from service.config import Settings
from tests.service.helpers import ADMIN_KEY, TEST_DEVICE, identity_encoder


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("encoder")
    identity_encoder(0).save(path)
    return path


@pytest.fixture(scope="session")
def other_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other-encoder")
    identity_encoder(1).save(path)
    return path


@pytest.fixture
def settings_for(encoder_dir: Path) -> Callable[..., Settings]:
    """`settings_for(**overrides)` -> Settings on the identity encoder, small limits, no polling."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"encoder": encoder_dir, "device": TEST_DEVICE, "poll_interval_s": 0,
                                     "max_wait_ms": 5.0, "threads": None, "api_key": ADMIN_KEY}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make
