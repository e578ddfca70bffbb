"""training.evaluate metrics on known answers, the NCC baseline, warps, and an end-to-end `ace eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ace_model.encoder import Encoder, EncoderSpec, load_encoder
from ace_model.preprocess import DecodedImage
from training.cli import main
from training.evaluate import (
    EncoderMethod,
    IdentityMethod,
    NCCMethod,
    choose_pairs,
    image_diagonal,
    map_points,
    mutual_metrics,
    radial_errors,
    random_affine,
    random_crop,
    random_encoder,
    retrieval_top1,
    summarize,
    summarize_by_landmark,
    warp_image,
)

LANDMARKS = ("apex", "knob", "dome")


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random grey texture in [0, 1], (height, width)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 8 + 2, width // 8 + 2))
    big = np.kron(coarse, np.ones((8, 8)))[:height, :width]
    fine = rng.random((height, width)) * 0.3
    return ((big + fine) / 1.3).astype(np.float32)


def grey(pixels: np.ndarray) -> DecodedImage:
    return DecodedImage(np.repeat(pixels[:, :, None], 3, axis=2), "png")


def test_radial_errors_and_diagonal() -> None:
    errors = radial_errors(np.array([[3.0, 4.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(errors, [5.0, 0.0])
    assert image_diagonal(30, 40) == pytest.approx(50.0)


def test_summarize_known_answer() -> None:
    summary = summarize(np.array([3.0, 4.0, 0.0, 10.0]), np.full(4, 100.0))
    assert summary["mean_px"] == pytest.approx(4.25)
    assert summary["median_px"] == pytest.approx(3.5)
    assert summary["mean_pct"] == pytest.approx(4.25)
    assert summary["success_2pct"] == pytest.approx(0.25)
    assert summary["success_5pct"] == pytest.approx(0.75)
    assert summary["n"] == 4


def test_summarize_uses_each_errors_own_diagonal() -> None:
    summary = summarize(np.array([2.0, 2.0]), np.array([100.0, 20.0]))  # 2 % and 10 %
    assert summary["mean_pct"] == pytest.approx(6.0)
    assert summary["success_2pct"] == pytest.approx(0.5)


def test_summarize_by_landmark_groups_by_name() -> None:
    out = summarize_by_landmark(["a", "b", "a"], np.array([1.0, 7.0, 3.0]), np.full(3, 100.0))
    assert list(out) == ["a", "b"]
    assert out["a"]["mean_px"] == pytest.approx(2.0)
    assert out["b"]["success_5pct"] == 0.0


def test_summarize_rejects_no_errors() -> None:
    with pytest.raises(ValueError, match="no errors"):
        summarize(np.array([]), np.array([]))


def test_mutual_metrics_split_errors_by_flag() -> None:
    out = mutual_metrics(np.array([True, False, True]), np.array([1.0, 9.0, 3.0]), np.full(3, 100.0))
    assert out["rate"] == pytest.approx(2 / 3)
    assert out["mean_pct_mutual"] == pytest.approx(2.0)
    assert out["mean_pct_not_mutual"] == pytest.approx(9.0)


def test_choose_pairs_all_or_seeded_subset() -> None:
    assert choose_pairs([None] * 3, None, 0) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    subset = choose_pairs([None] * 10, 7, seed=1)
    assert len(subset) == 7 and all(q != t for q, t in subset)
    assert subset == choose_pairs([None] * 10, 7, seed=1)


def test_choose_pairs_never_pairs_one_patients_images() -> None:
    assert choose_pairs(["a", "a", "b"], None, 0) == [(0, 2), (1, 2), (2, 0), (2, 1)]


def test_retrieval_top1_known_answers() -> None:
    vectors = torch.eye(4)
    assert retrieval_top1(vectors, vectors, [[0, 1], [2, 3]]) == 1.0
    assert retrieval_top1(vectors, vectors[[1, 0, 3, 2]], [[0, 1], [2, 3]]) == 0.0


def test_random_crop_keeps_the_input_size() -> None:
    crop = random_crop(torch.rand(3, 32, 32), np.random.default_rng(0))
    assert crop.shape == (3, 32, 32)


@pytest.mark.slow
def test_random_encoder_is_seeded() -> None:
    spec = EncoderSpec("vit_tiny_patch16_224", 64)
    first, second = random_encoder(spec, seed=3), random_encoder(spec, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_ncc_finds_an_exact_copy_at_the_right_place() -> None:
    image = grey(texture(64, 64, seed=0))
    ncc = NCCMethod(size=64, template_px=15)
    ncc.fit([image, image])
    points = np.array([[10.5, 20.5], [40.5, 33.5], [55.5, 8.5], [32.0, 32.0]])
    errors = radial_errors(ncc.locate(0, 1, points), points)
    assert errors.max() < 0.5


def test_ncc_finds_a_shifted_copy_in_original_pixels() -> None:
    pixels = texture(96, 128, seed=1)  # non-square: letterboxed at 64
    shifted = np.roll(pixels, shift=(6, -10), axis=(0, 1))
    ncc = NCCMethod(size=64, template_px=15)
    ncc.fit([grey(pixels), grey(shifted)])
    points = np.array([[40.5, 40.5], [80.5, 60.5]])
    errors = radial_errors(ncc.locate(0, 1, points), points + np.array([-10.0, 6.0]))
    assert errors.max() < 2.0  # one model pixel is 2 original pixels here


@pytest.mark.slow
def test_encoder_method_maps_an_identical_image_back_within_a_patch(tiny_artifact: Path) -> None:
    image = grey(texture(48, 96, seed=2))  # letterboxed: 64 px model side, 1.5 original px per model px
    method = EncoderMethod("tiny", load_encoder(tiny_artifact))
    method.fit([image, image])
    points = np.array([[12.0, 20.0], [50.5, 24.5], [90.0, 30.0]])
    errors = radial_errors(method.locate(0, 1, points), points)
    assert errors.max() < 16 * 1.5  # one 16-px patch in original pixels


def test_identity_baseline_keeps_the_relative_position() -> None:
    same = IdentityMethod()
    same.fit([grey(np.zeros((50, 100), np.float32)), grey(np.zeros((100, 300), np.float32))])
    np.testing.assert_allclose(same.locate(0, 1, np.array([[50.0, 25.0]])), [[150.0, 50.0]])


def test_warp_moves_a_point_where_map_points_says() -> None:
    height, width = 80, 100
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres in our convention
    spot = np.array([30.0, 50.0])
    blob = np.exp(-((xs - spot[0]) ** 2 + (ys - spot[1]) ** 2) / (2 * 2.0**2)).astype(np.float32)
    tform = random_affine(width, height, np.random.default_rng(4))
    warped = warp_image(grey(blob), tform).pixels[:, :, 0]
    centroid = np.array([(warped * xs).sum(), (warped * ys).sum()]) / warped.sum()
    np.testing.assert_allclose(centroid, map_points(tform, spot[None])[0], atol=0.1)


def write_landmark_set(root: Path, n: int = 4) -> None:
    """n textured images with bright spots at known, slightly moved landmark positions."""
    (root / "images").mkdir(parents=True)
    rows, meta = ["image,landmark,x,y"], ["image,image_id,patient_id"]
    for i in range(n):
        pixels = texture(64, 80, seed=10 + i)
        for j, name in enumerate(LANDMARKS):
            x, y = 15.5 + 22 * j + i, 20.5 + 10 * j - i
            pixels[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3] = 1.0
            rows.append(f"images/s{i}.png,{name},{x},{y}")
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / "images" / f"s{i}.png")
        meta.append(f"images/s{i}.png,subject{i},p{i}")
    (root / "landmarks.csv").write_text("\n".join(rows) + "\n")
    (root / "metadata.csv").write_text("\n".join(meta) + "\n")


@pytest.fixture
def tiny_artifact(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    Encoder(EncoderSpec("vit_tiny_patch16_224", 64)).save(tmp_path / "encoder")
    return tmp_path / "encoder"


@pytest.mark.slow
def test_ace_eval_end_to_end_writes_the_report(tmp_path: Path, tiny_artifact: Path) -> None:
    write_landmark_set(tmp_path / "data")
    out = tmp_path / "report"
    code = main(["eval", "--encoder", str(tiny_artifact), "--encoder-b", str(tiny_artifact),
                 "--name-b", "ablation", "--refine-ablation", "--random-baseline",
                 "--ncc", "--ncc-template", "9", "--identity-baseline",
                 "--data", str(tmp_path / "data"), "--crop-group", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    methods = ["ace", "ablation", "ace (no sub-patch)", "random-init", "ncc", "same-position"]
    assert [m["name"] for m in report["methods"]] == methods
    assert report["n_images"] == 4 and report["n_pairs"] == 12
    assert list(report["landmarks"]) == methods
    assert list(report["landmarks"]["ncc"]["per_landmark"]) == list(LANDMARKS)
    assert report["landmarks"]["same-position"]["overall"]["mean_px"] < 10  # landmarks move 1-2 px
    assert report["landmarks"]["ace"]["overall"]["n"] == 12 * len(LANDMARKS)
    assert report["landmarks"]["ace"] == report["landmarks"]["ablation"]  # same weights
    assert "mutual" in report["landmarks"]["ace"] and "mutual" not in report["landmarks"]["ncc"]
    assert list(report["crop_retrieval"]) == ["ace", "ablation", "random-init"]
    assert report["crop_retrieval"]["ace"]["chance"] == pytest.approx(0.25)
    markdown = (out / "report.md").read_text()
    for heading in ("## Cross-subject landmark localisation", "## Crop retrieval", "| ncc |"):
        assert heading in markdown
    for plot in ("errors_per_landmark.png", "pairs.png"):
        assert (out / plot).stat().st_size > 1000


def test_ace_eval_explains_a_missing_landmark_csv(tmp_path: Path, tiny_artifact: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--encoder", str(tiny_artifact), "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "landmarks.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_ace_eval_real_images(tmp_path: Path, tiny_artifact: Path) -> None:
    write_landmark_set(tmp_path / "data", n=2)
    out = tmp_path / "report"
    code = main(["eval", "--encoder", str(tiny_artifact), "--ncc", "--real", "--real-transforms", "1",
                 "--data", str(tmp_path / "data"), "--out", str(out)])
    assert code == 0
    real = json.loads((out / "report.json").read_text())["real"]
    assert set(real) == {"ace", "ncc"}
    assert set(real["ncc"]) == {"chest_cr", "fundus"}
    assert "## Real images" in (out / "report.md").read_text()
