"""`ace eval`: metrics and calibration on known answers, the NCC baselines (model size and full
resolution), affine and elastic warps checked against pixel content, landmark retrieval on a
constructed case, the real-image selection, and end-to-end runs with a tiny random dense encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ace_model.encoder import Encoder, EncoderSpec, load_encoder
from ace_model.preprocess import DecodedImage
from training import eval_real
from training.cli import main
from training.eval_methods import (
    EncoderMethod,
    FullResolutionNCC,
    IdentityMethod,
    NCCMethod,
    random_encoder,
    textured,
)
from training.eval_real import RealImage, random_warp, real_evaluation, warp_case, warp_image
from training.eval_retrieval import (
    best_cells,
    random_crop,
    retrieval_share,
    retrieval_top1,
    top_images,
    within,
)
from training.evaluate import (
    calibration,
    choose_pairs,
    error_bins,
    image_diagonal,
    mutual_metrics,
    pair_timing,
    radial_errors,
    summarize,
    summarize_by_landmark,
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
    """[0, 1] grey levels as a decoded 8-bit image."""
    levels = np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    return DecodedImage(np.repeat(levels[:, :, None], 3, axis=2), "png")


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


def test_random_dense_encoder_keeps_the_pyramid_options() -> None:
    spec = EncoderSpec("ace_dense_pyramid", 64, options={"widths": [8, 8, 8, 8, 8], "coarse_dim": 16})
    encoder = random_encoder(spec, seed=1)
    assert encoder.spec.options == spec.options and encoder.dim == 16


def test_error_bins_known_answer() -> None:
    confidence = np.array([0.1, 0.2, 0.6, 0.9, 1.0, 0.8])
    errors = np.array([10.0, 6.0, 3.0, 1.0, 0.5, 4.0])
    bins = error_bins(confidence, errors, (0.0, 0.25, 0.5, 0.75, 1.0))
    assert [b["n"] for b in bins] == [2, 0, 1, 3]  # 1.0 falls in the last, closed bin
    assert bins[0]["median_pct"] == pytest.approx(8.0) and bins[0]["success_5pct"] == 0.0
    assert bins[1]["median_pct"] is None and bins[1]["success_5pct"] is None
    assert bins[3]["median_pct"] == pytest.approx(1.0)
    assert bins[3]["success_2pct"] == pytest.approx(2 / 3) and bins[3]["success_5pct"] == 1.0


def test_calibration_quartiles_have_equal_counts_even_when_tied() -> None:
    confidence = np.array([1.0] * 6 + [0.2, 0.4])
    errors = np.arange(8, dtype=float)
    out = calibration(confidence, errors)
    assert [q["n"] for q in out["quartiles"]] == [2, 2, 2, 2]
    assert out["quartiles"][0]["low"] == pytest.approx(0.2)
    assert out["quartiles"][0]["median_pct"] == pytest.approx(6.5)  # the two least confident
    assert sum(b["n"] for b in out["fixed"]) == 8


def test_pair_timing_adds_the_share_of_one_image() -> None:
    timing = pair_timing(fit_seconds=4.0, n_images=8, locate_seconds=2.0, n_pairs=20)
    assert timing["fit_seconds_per_image"] == pytest.approx(0.5)
    assert timing["locate_seconds_per_pair"] == pytest.approx(0.1)
    assert timing["seconds_per_pair"] == pytest.approx(0.6)


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


def test_full_resolution_ncc_finds_a_planted_template_exactly() -> None:
    target = texture(150, 200, seed=3)
    query = texture(120, 160, seed=4)  # unrelated content, except for one planted patch
    query[40:71, 90:121] = target[100:131, 30:61]  # 31 px patch: query (105, 55) = target (45, 115)
    ncc = FullResolutionNCC(fraction=21 / 160)  # a 21 px template, inside the patch
    ncc.fit([grey(query), grey(target)])
    assert ncc.template_side(ncc.images[0]) == 21
    found = ncc.locate(0, 1, np.array([[105.5, 55.5], [100.2, 60.7]]))
    np.testing.assert_allclose(found, [[45.5, 115.5], [40.2, 120.7]], atol=0.35)  # sub-pixel fit only
    assert np.array_equal(np.floor(found[0]), [45, 115])  # the integer peak is the planted pixel


def test_ncc_never_answers_on_flat_windows() -> None:
    """Flat (black) windows have no NCC; their floating-point noise must not win the argmax."""
    pixels = np.zeros((60, 90), np.float32)
    pixels[10:50, 50:85] = texture(40, 35, seed=11)
    mask = textured(pixels, 9).numpy()
    assert not mask[5:55, 5:40].any() and mask[20:40, 60:75].all()
    ncc = FullResolutionNCC(fraction=9 / 90)
    ncc.fit([grey(pixels), grey(pixels)])
    points = np.array([[60.5, 20.5], [70.5, 40.5], [20.5, 30.5]])  # the last on black: no answer
    found = ncc.locate(0, 1, points)
    np.testing.assert_allclose(found[:2], points[:2], atol=0.35)
    assert mask[int(found[2, 1]), int(found[2, 0])]  # even a flat query lands on content


@pytest.mark.slow
def test_encoder_method_maps_an_identical_image_back_within_a_patch(tiny_artifact: Path) -> None:
    image = grey(texture(48, 96, seed=2))  # letterboxed: 64 px model side, 1.5 original px per model px
    method = EncoderMethod("tiny", load_encoder(tiny_artifact))
    method.fit([image, image])
    points = np.array([[12.0, 20.0], [50.5, 24.5], [90.0, 30.0]])
    errors = radial_errors(method.locate(0, 1, points), points)
    assert errors.max() < 16 * 1.5  # one 16-px patch in original pixels


def test_encoder_variants_share_one_embedding(dense_artifact: Path) -> None:
    encoder = load_encoder(dense_artifact)
    cache: dict = {}
    both = EncoderMethod("both", encoder, second_look=True, cache=cache)
    coarse = EncoderMethod("coarse", encoder, cache=cache)
    images = [grey(texture(110, 130, seed=5)), grey(texture(120, 104, seed=6))]  # a 2x look pays
    both.fit(images)
    coarse.fit(images)
    assert coarse.base is both.base and both.high is not None and both.high.levels[0].side == 128
    assert coarse.fit_seconds == pytest.approx(both.base.seconds)
    assert coarse.fit_seconds < both.fit_seconds
    found = both.find(0, 1, np.array([[30.0, 30.0], [10.5, 50.5]]))
    assert found.xy.shape == (2, 2) and found.confidence.shape == (2,) and found.mutual.dtype == bool
    with pytest.raises(ValueError, match="dense"):
        EncoderMethod("vit", Encoder(EncoderSpec("vit_tiny_patch16_224", 64)), second_look=True)


def test_identity_baseline_keeps_the_relative_position() -> None:
    same = IdentityMethod()
    same.fit([grey(np.zeros((50, 100), np.float32)), grey(np.zeros((100, 300), np.float32))])
    np.testing.assert_allclose(same.locate(0, 1, np.array([[50.0, 25.0]])), [[150.0, 50.0]])


def dot(height: int, width: int, centre: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres in our convention
    return np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


@pytest.mark.parametrize("kind", ["affine", "elastic"])
def test_warp_puts_a_dot_where_the_forward_map_says(kind: str) -> None:
    """W(q) = I(F(q)): the dot's centroid c in the warped image maps back onto the dot, F(c) = p."""
    height, width = 100, 120
    rng = np.random.default_rng(7)
    for spot in ([40.0, 50.0], [75.3, 30.8], [60.0, 70.5]):
        warp = random_warp(width, height, kind, rng)
        warped = warp_image(grey(dot(height, width, np.array(spot))), warp).pixels[:, :, 0]
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        centroid = np.array([(warped * xs).sum(), (warped * ys).sum()]) / warped.sum()
        np.testing.assert_allclose(warp.source_of(centroid), spot, atol=0.2)


def test_elastic_warp_is_not_affine() -> None:
    warp = random_warp(200, 160, "elastic", np.random.default_rng(0))
    grid = np.stack(np.meshgrid(np.linspace(20, 180, 5), np.linspace(20, 140, 5)), -1).reshape(-1, 2)
    field = warp.source_of(grid) - (grid @ warp.matrix[:2, :2].T + warp.matrix[:2, 2])
    assert 0.5 < np.abs(field).max() <= 0.03 * 160 * 1.001  # a field, bounded by its amplitude


def test_warp_case_truth_is_on_the_content_it_came_from() -> None:
    height, width = 90, 110
    spot = np.array([52.0, 47.0])
    pixels = texture(height, width, seed=8) * 0.5 + dot(height, width, spot, sigma=2.0)
    case = warp_case("dot", grey(pixels), "elastic", np.random.default_rng(2), per_side=5)
    assert len(case.points) > 10 and case.points.shape == case.truth.shape
    nearest = int(np.argmin(radial_errors(case.points, spot[None])))
    col, row = np.floor(case.truth[nearest]).astype(int)  # the warped pixel of the grid point
    source = case.points[nearest]
    expected = pixels[int(source[1]), int(source[0])]
    assert abs(case.warped.as_float()[row, col, 0] - expected) < 0.15


def test_best_cells_and_top_images_on_a_constructed_index() -> None:
    d = torch.eye(4)
    grids = torch.zeros(4, 3, 3, 4)
    grids[..., 3] = 1.0  # every cell is e3 ...
    grids[1, 2, 1] = d[0]  # ... image 1 has the query vector at (2, 1)
    grids[2, 0, 0] = 0.8 * d[0] + 0.6 * d[1]  # image 2 a weaker match at (0, 0)
    grids[2, 1, 1] = d[0]  # and the exact vector on a padding cell, which must not count
    grids[3, 1, 2] = d[0]  # image 3 is the query's own subject
    valid = torch.ones(4, 3, 3, dtype=torch.bool)
    valid[2, 1, 1] = False
    scores, cells = best_cells(d[:1], grids, valid)
    torch.testing.assert_close(scores[0], torch.tensor([0.0, 1.0, 0.8, 1.0]))
    assert cells[0, 1].tolist() == [2, 1] and cells[0, 2].tolist() == [0, 0]
    allowed = np.array([False, True, True, False])  # not the query (0) nor its subject (3)
    assert top_images(scores[0], allowed, k=10) == [1, 2]
    assert top_images(scores[0], allowed, k=1) == [1]


def test_retrieval_share_counts_hits_within_five_percent() -> None:
    truth = np.array([[50.0, 50.0], [50.0, 50.0], [10.0, 10.0], [0.0, 0.0]])
    found = truth + np.array([[4.0, 0.0], [6.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    ok = within(found, truth, np.full(4, 100.0))  # 5 % of a 100 px diagonal = 5 px
    assert ok.tolist() == [True, False, True, True]
    share = retrieval_share(ok.tolist(), ["a", "a", "b", "b"])
    assert share["share"] == pytest.approx(0.75) and share["n_hits"] == 4
    assert share["per_landmark"]["a"]["share"] == pytest.approx(0.5)
    assert share["per_landmark"]["b"] == {"share": 1.0, "n_hits": 2}


@pytest.mark.slow
def test_real_images_are_the_real_acquisitions_the_packages_ship() -> None:
    kept, skipped = eval_real.real_images()
    names = {r.name for r in kept}
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert {"RG1_UNCR.dcm", "MR2_UNCR.dcm", "CT_small.dcm", "US1_UNCR.dcm", "retina (fundus)"} <= names
    assert all(min(r.image.width, r.image.height) >= 64 for r in kept)
    assert "another encoding" in reasons["RG1_J2KI.dcm"]
    assert "same image" in reasons["examples_palette.dcm"]  # a crop of OBXXXX1A.dcm
    assert "modality OT" in reasons["SC_rgb.dcm"] and "modality SEG" in reasons["liver_1frame.dcm"]
    assert any(r.note.startswith("first of") for r in kept)  # multi-frame files: the first frame


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


@pytest.fixture
def dense_artifact(tmp_path: Path) -> Path:
    """A tiny random two-level dense encoder (the default pyramid) at 64 px."""
    torch.manual_seed(0)
    Encoder(EncoderSpec("ace_dense_pyramid", 64)).save(tmp_path / "dense")
    return tmp_path / "dense"


def small_real_images() -> tuple[list[RealImage], list[dict[str, str]]]:
    channels = [np.rint(texture(72, 90, seed=s) * 255).astype(np.uint8) for s in (20, 21, 22)]
    colour = np.stack(channels, axis=-1)
    return ([RealImage("grey.dcm", grey(texture(96, 80, seed=9)), "test", "CT"),
             RealImage("colour", DecodedImage(colour, "png"), "test", "OP")],
            [{"name": "pattern.dcm", "source": "test", "reason": "modality OT: not an image acquisition"}])


def test_ace_eval_end_to_end_writes_the_report(tmp_path: Path, dense_artifact: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_real, "real_images", small_real_images)
    write_landmark_set(tmp_path / "data")
    out = tmp_path / "report"
    code = main(["eval", "--encoder", str(dense_artifact), "--encoder-b", str(dense_artifact),
                 "--name-b", "twin", "--match-ablation", "--refine-ablation", "--random-baseline",
                 "--ncc", "--ncc-template", "9", "--identity-baseline", "--retrieval", "--retrieval-k", "2",
                 "--real", "--real-transforms", "1", "--data", str(tmp_path / "data"),
                 "--crop-group", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    methods = ["ace", "ace coarse", "ace fine", "ace both", "ace both+2nd look", "ace (no sub-patch)", "twin",
               "random-init", "ncc", "ncc-full", "same-position"]
    assert [m["name"] for m in report["methods"]] == methods
    assert report["n_images"] == 4 and report["n_pairs"] == 12
    assert list(report["landmarks"]) == methods == list(report["timing"])
    landmarks = report["landmarks"]
    assert list(landmarks["ncc-full"]["per_landmark"]) == list(LANDMARKS)
    assert landmarks["same-position"]["overall"]["mean_px"] < 10  # landmarks move 1-2 px
    assert landmarks["ace"]["overall"]["n"] == 12 * len(LANDMARKS)
    assert landmarks["ace"] == landmarks["twin"] == landmarks["ace both+2nd look"]  # same weights and matcher
    assert "mutual" in landmarks["ace"] and "mutual" not in landmarks["ncc"]
    assert sum(b["n"] for b in landmarks["ace"]["calibration"]["fixed"]) == 12 * len(LANDMARKS)
    assert "calibration" not in landmarks["ncc-full"]
    timing = report["timing"]
    # these images are too small for a 2x look (look_scales): the look costs nothing here
    assert timing["ace"]["fit_seconds_per_image"] == timing["ace both"]["fit_seconds_per_image"]
    assert timing["ncc-full"]["seconds_per_pair"] > 0
    assert list(report["crop_retrieval"]) == ["ace", "twin", "random-init"]
    assert report["crop_retrieval"]["ace"]["chance"] == pytest.approx(0.25)
    retrieval = report["landmark_retrieval"]["ace"]
    assert retrieval["n_queries"] == 4 * len(LANDMARKS) and retrieval["n_hits"] == 4 * len(LANDMARKS) * 2
    assert 0.0 <= retrieval["share"] <= 1.0 and list(retrieval["per_landmark"]) == list(LANDMARKS)
    real = report["real"]
    assert [i["name"] for i in real["images"]] == ["grey.dcm", "colour"]
    assert list(real["methods"]) == methods
    assert set(real["methods"]["ncc-full"]["per_kind"]) == {"affine", "elastic"}
    assert set(real["methods"]["ace"]["per_image"]["colour"]) == {"affine", "elastic"}
    assert "calibration" in real["methods"]["ace"] and real["methods"]["ace"]["timing"]["n_pairs"] == 4
    markdown = (out / "report.md").read_text()
    for heading in ("## Figures", "## Cross-subject landmark localisation", "## Confidence calibration",
                    "## Timing", "## Crop retrieval", "## Landmark retrieval", "## Real images",
                    "| ncc-full |", "full-resolution NCC", "modality OT", "ace eval --encoder"):
        assert heading in markdown
    for plot in ("errors_per_landmark.png", "pairs.png"):
        assert (out / plot).stat().st_size > 1000


def test_real_evaluation_answers_every_point_once_per_warp(dense_artifact: Path) -> None:
    images, _ = small_real_images()
    method = EncoderMethod("ace", load_encoder(dense_artifact), second_look=True)
    out = real_evaluation([method, FullResolutionNCC(0.2)], per_kind=2, seed=0, images=images)
    assert out["warps_per_kind"] == 2 and out["skipped"] == []
    for result in out["methods"].values():
        per_kind = result["per_kind"]
        assert per_kind["affine"]["n"] + per_kind["elastic"]["n"] == result["overall"]["n"]
        assert result["timing"]["n_pairs"] == 2 * 2 * 2  # images x kinds x warps
    assert out["methods"]["ncc-full"]["overall"]["median_pct"] < 2.0  # textures, mild warps


def test_ace_eval_explains_a_missing_landmark_csv(tmp_path: Path, dense_artifact: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--encoder", str(dense_artifact), "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "landmarks.csv" in capsys.readouterr().err
