"""The two-level dense encoder, its view pairs with known geometry, its losses and its training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ace_model.dense import DensePyramid, PyramidConfig
from ace_model.dense_losses import info_nce
from ace_model.encoder import ArtifactError, Encoder, EncoderSpec, load_encoder
from training.dense_train import (
    DenseTrainConfig,
    cell_sources,
    export_dense,
    sample_index,
    train_dense,
)
from training.dense_views import WarpConfig, make_view_pair

SMALL = PyramidConfig(widths=(4, 8, 8, 8, 8), coarse_dim=8, fine_dim=8)


def test_pyramid_gives_two_unit_norm_levels_at_strides_16_and_4() -> None:
    coarse, fine = DensePyramid(SMALL).eval()(torch.randn(2, 3, 96, 96))
    assert coarse.shape == (2, 6, 6, 8) and fine.shape == (2, 24, 24, 8)
    torch.testing.assert_close(coarse.norm(dim=-1), torch.ones(2, 6, 6))
    torch.testing.assert_close(fine.norm(dim=-1), torch.ones(2, 24, 24))


def test_pyramid_sees_grey_levels_only_and_refuses_odd_sizes() -> None:
    model = DensePyramid(SMALL).eval()
    grey = torch.randn(1, 1, 64, 64)
    colour = torch.cat([grey + 1, grey - 1, grey], dim=1)  # same channel mean
    torch.testing.assert_close(model(grey.expand(-1, 3, -1, -1))[1], model(colour)[1])
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 80, 80))


def dot_sources(points: list[tuple[float, float]], h: int = 256, w: int = 200) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 8.0)[None] for x, y in points])


def test_view_geometry_maps_view_pixels_to_their_source_pixels() -> None:
    """A bright dot in the source is seen in each view where to_source says it comes from."""
    points = [(100.0, 128.0), (90.0, 140.0), (110.0, 120.0)]  # central: visible in every view
    sources = dot_sources(points)
    views = make_view_pair(sources, WarpConfig(view_px=128), torch.Generator().manual_seed(1))
    for view in views:
        for b, (x, y) in enumerate(points):
            row, col = divmod(int(view.images[b, 0].argmax()), 128)
            where = torch.tensor([[[col + 0.5, row + 0.5]]]).expand(3, 1, 2).contiguous()
            found = view.to_source(where)[b, 0]
            zoom = float(view.affine[b, :, :2].det().abs().sqrt())
            assert math.dist(found.tolist(), (x, y)) <= zoom + 0.5  # within one view pixel


def test_cells_of_two_views_meet_in_source_coordinates() -> None:
    sources = dot_sources([(100.0, 128.0)] * 2)
    first, second = make_view_pair(sources, WarpConfig(view_px=64), torch.Generator().manual_seed(0))
    a, b = cell_sources(first, 16), cell_sources(second, 16)
    assert a.shape == b.shape == (2, 16, 2)
    assert torch.cdist(a, b).min() < 40  # the views overlap (the pair's shift is at most 10 %)


def test_info_nce_ignores_the_ignore_zone_and_reaches_zero_on_a_perfect_match() -> None:
    keys = torch.nn.functional.normalize(torch.randn(1, 10, 16), dim=-1)
    positive = torch.arange(5)[None]
    ignore = torch.zeros(1, 5, 10, dtype=torch.bool)
    valid = torch.ones(1, 5, dtype=torch.bool)
    term = info_nce(keys[:, :5], keys, positive, ignore, valid, tau=0.01)
    assert float(term.loss) < 1e-3 and term.count == 5
    assert term.chance == pytest.approx(math.log(10))
    near = torch.ones(1, 5, 10, dtype=torch.bool)
    near[0, torch.arange(5), positive[0]] = False  # everything but the positive ignored
    assert float(info_nce(keys[:, :5] * 0, keys, positive, near, valid, 0.1).loss) < 1e-3


def test_sample_index_draws_distinct_subjects() -> None:
    subjects = ["a", "a", "b", "b", "c"]
    for seed in range(5):
        index = sample_index(subjects, 3, torch.Generator().manual_seed(seed)).tolist()
        assert sorted(subjects[i] for i in index) == ["a", "b", "c"]


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.phantoms import PhantomConfig, write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("ph"), 4, seed=3, config=PhantomConfig(size=96))


def test_training_runs_resumes_and_exports_a_two_level_artifact(phantom_set: Path, tmp_path: Path) -> None:
    cfg = DenseTrainConfig(steps=3, pairs=2, warmup=1, fine_queries=16, source_px=96, checkpoint_every=2)
    warp = WarpConfig(view_px=64)
    state = train_dense([phantom_set], tmp_path / "run", cfg, warp, SMALL, progress=False)
    assert state.step == 3 and set(state.history[-1]) == {"fine", "coarse", "xsubj_c", "xsubj_f", "global"}
    resumed = train_dense([phantom_set], tmp_path / "run", cfg, warp, SMALL, progress=False)
    assert resumed.step == 3  # nothing left to do
    export_dense(state, tmp_path / "enc", 64, {"step": 3})
    encoder = load_encoder(tmp_path / "enc")
    levels = encoder.levels()
    assert levels["coarse"] == {"stride": 16, "dim": 8, "grid": 4}
    assert levels["fine"] == {"stride": 4, "dim": 8, "grid": 16}
    out = encoder(torch.randn(1, 3, 64, 64))
    assert out.patches.shape == (1, 4, 4, 8) and out.fine is not None and out.fine.shape == (1, 16, 16, 8)
    assert encoder(torch.randn(1, 3, 128, 128)).fine.shape == (1, 32, 32, 8)  # type: ignore[union-attr]


def test_old_single_level_artifacts_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    encoder = Encoder(EncoderSpec("ace_dense_pyramid", 64, options=SMALL.to_dict()))
    encoder.save(tmp_path)
    meta = (tmp_path / "encoder.json").read_text().replace('"format": 2', '"format": 1')
    (tmp_path / "encoder.json").write_text(meta)
    with pytest.raises(ArtifactError, match=r"format 1 .*single-level.*no longer loaded"):
        load_encoder(tmp_path)


def test_train_dense_cli_reports_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    assert main(["train-dense", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no such data folder" in capsys.readouterr().err
    assert main(["train-dense", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--pairs", "1"]) == 2
    assert "--pairs >= 2" in capsys.readouterr().err
