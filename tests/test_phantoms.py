"""Synthetic chest radiograph phantoms: determinism, anatomy of the landmarks, pose consistency,
the hard difficulty, the landmark data set format and `ace data`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main as ace
from training.landmarks import LandmarkFormatError, read_landmark_set
from training.phantom_render import collimator_mask, render_phantom, warp
from training.phantom_sampling import sample_acquisition, sample_anatomy, sample_pose, sample_view_extras
from training.phantom_shapes import image_landmarks
from training.phantom_types import LANDMARK_NAMES, Anatomy, Phantom, PhantomConfig, Pose
from training.phantoms import (
    generate_phantom,
    shifted,
    subject_geometry,
    subject_rng,
    template_matching_errors,
    write_phantom_set,
)

SIZE = 256
CLEAN = PhantomConfig(size=SIZE, noise=False)
HARD = PhantomConfig(size=SIZE, noise=False, difficulty="hard")
SUBJECTS = range(6)


def upright(subject: int, config: PhantomConfig = CLEAN, pose: Pose | None = None) -> Phantom:
    """Subject `subject` (seed 0) with the given pose (identity by default), masks included."""
    anatomy = sample_anatomy(subject_rng(0, subject, 0))
    acquisition = sample_acquisition(subject_rng(0, subject, 2))
    return render_phantom(anatomy, pose or Pose(), acquisition, config, subject_rng(0, subject, 3), True)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [upright(subject) for subject in SUBJECTS]


def pixel(array: np.ndarray, x: float, y: float) -> float | bool:
    return array[int(np.floor(y)), int(np.floor(x))]


def mean_around(image: np.ndarray, x: float, y: float, radius: int = 2) -> float:
    row, col = int(y), int(x)
    return float(image[row - radius:row + radius + 1, col - radius:col + radius + 1].mean())


def lateral(side: str) -> float:
    """Image-x direction pointing away from the midline on the patient's `side`."""
    return -1.0 if side == "right" else 1.0


# --- determinism and variation -------------------------------------------------------------------


def test_same_seed_same_phantom() -> None:
    a, b = generate_phantom(3, seed=7, config=PhantomConfig(size=SIZE)), generate_phantom(
        3, seed=7, config=PhantomConfig(size=SIZE))
    assert np.array_equal(a.image, b.image)
    assert a.landmarks == b.landmarks


def test_subjects_and_seeds_differ() -> None:
    config = PhantomConfig(size=SIZE)
    base = generate_phantom(0, seed=0, config=config)
    for other in (generate_phantom(1, seed=0, config=config), generate_phantom(0, seed=1, config=config)):
        assert np.abs(base.image.astype(float) - other.image).mean() > 5
        assert base.landmarks["carina"] != other.landmarks["carina"]


def test_views_share_anatomy_but_not_pose() -> None:
    first, second = (generate_phantom(2, config=PhantomConfig(size=SIZE), view=v) for v in (0, 1))
    assert first.landmarks != second.landmarks
    same = sample_anatomy(subject_rng(0, 2, 0)).lungs == sample_anatomy(subject_rng(0, 2, 0)).lungs
    assert same


def test_image_format_and_bit_depth() -> None:
    eight = generate_phantom(0, config=PhantomConfig(size=96))
    sixteen = generate_phantom(0, config=PhantomConfig(size=96, bit_depth=16))
    assert eight.image.shape == (96, 96) and eight.image.dtype == np.uint8
    assert sixteen.image.dtype == np.uint16 and sixteen.image.max() > 255
    with pytest.raises(ValueError, match="bit_depth"):
        PhantomConfig(bit_depth=12)


def test_landmarks_named_and_inside_the_image() -> None:
    config = PhantomConfig(size=SIZE)
    rendered = generate_phantom(7, config=config)
    assert tuple(rendered.landmarks) == LANDMARK_NAMES
    assert rendered.landmarks == image_landmarks(*subject_geometry(7, 0, config), SIZE)
    for subject in range(80):
        landmarks = image_landmarks(*subject_geometry(subject, 0, config), SIZE)
        xy = np.array(list(landmarks.values()))
        assert np.all((xy > 0.02 * SIZE) & (xy < 0.98 * SIZE)), subject


# --- landmarks lie on the anatomy they name (upright, noise-free renders) -------------------------


def test_hemidiaphragm_dome_tops_the_lung_diaphragm_edge(phantoms: list[Phantom]) -> None:
    step = 0.02 * SIZE
    for phantom in phantoms:
        for side in ("left", "right"):
            x, y = phantom.landmarks[f"hemidiaphragm_dome_{side}"]
            assert pixel(phantom.masks[f"lung_{side}"], x, y - step)
            assert pixel(phantom.masks["abdomen"], x, y + step)
            assert mean_around(phantom.image, x, y + step) > mean_around(phantom.image, x, y - step) + 20
            lung_column = phantom.masks[f"lung_{side}"][:, int(x)]
            assert abs(np.nonzero(lung_column)[0].max() + 1 - y) < 2
            # the top: the diaphragm surface falls away on both sides of the dome
            surface = phantom.masks["abdomen"].argmax(axis=0)
            around = [surface[int(x + dx)] for dx in (-0.08 * SIZE, 0.08 * SIZE)]
            assert min(around) >= surface[int(x)] and max(around) > surface[int(x)] + 1


def test_lung_apex_is_the_top_of_the_dark_lung(phantoms: list[Phantom]) -> None:
    step = 0.02 * SIZE
    for phantom in phantoms:
        for side in ("left", "right"):
            x, y = phantom.landmarks[f"lung_apex_{side}"]
            lung = phantom.masks[f"lung_{side}"]
            assert pixel(lung, x, y + step) and not pixel(lung, x, y - step)
            assert abs(np.nonzero(lung.any(axis=1))[0].min() - y) < 2
            assert mean_around(phantom.image, x, y + step) < mean_around(phantom.image, x, y - step)


def test_heart_borders_sit_on_the_lung_heart_edge(phantoms: list[Phantom]) -> None:
    step = 0.025 * SIZE
    for phantom in phantoms:
        for side in ("left", "right"):
            x, y = phantom.landmarks[f"heart_border_{side}"]
            out = lateral(side) * step
            assert pixel(phantom.masks["heart"], x - out, y)
            assert pixel(phantom.masks[f"lung_{side}"], x + out, y)
            assert mean_around(phantom.image, x + out, y) < mean_around(phantom.image, x - out, y) - 20
            heart_columns = np.nonzero(phantom.masks["heart"].any(axis=0))[0]
            extreme = heart_columns.min() if side == "right" else heart_columns.max() + 1
            assert abs(extreme - x) < 2


def test_costophrenic_angles_are_the_lowest_lateral_lung_points(phantoms: list[Phantom]) -> None:
    for phantom in phantoms:
        for side in ("left", "right"):
            x, y = phantom.landmarks[f"costophrenic_angle_{side}"]
            rows, cols = np.nonzero(phantom.masks[f"lung_{side}"])
            lowest = rows.argmax()
            assert abs(rows[lowest] + 1 - y) < 2 and abs(cols[lowest] + 0.5 - x) < 0.03 * SIZE
            dome_x, _ = phantom.landmarks[f"hemidiaphragm_dome_{side}"]
            assert lateral(side) * (x - dome_x) > 0


def test_mediastinal_landmarks(phantoms: list[Phantom]) -> None:
    step = 0.02 * SIZE
    for phantom in phantoms:
        x, y = phantom.landmarks["carina"]
        assert pixel(phantom.masks["mediastinum"], x, y)
        assert mean_around(phantom.image, x, y - step) < mean_around(phantom.image, x, y + step)
        x, y = phantom.landmarks["aortic_knob"]
        assert pixel(phantom.masks["mediastinum"], x - step, y)
        assert pixel(phantom.masks["lung_left"], x + step, y)
        assert mean_around(phantom.image, x + step, y) < mean_around(phantom.image, x - step, y)


def test_hila_are_bright_shadows_in_the_medial_lungs(phantoms: list[Phantom]) -> None:
    for phantom in phantoms:
        midline = phantom.landmarks["carina"][0]
        for side in ("left", "right"):
            x, y = phantom.landmarks[f"hilum_{side}"]
            lung = phantom.masks[f"lung_{side}"]
            assert lateral(side) * (x - midline) > 0.05 * SIZE
            assert mean_around(phantom.image, x, y) > phantom.image[lung].mean()


def test_clavicle_heads_near_the_midline_above_the_hila(phantoms: list[Phantom]) -> None:
    for phantom in phantoms:
        midline = phantom.landmarks["carina"][0]
        for side in ("left", "right"):
            x, y = phantom.landmarks[f"clavicle_head_{side}"]
            assert pixel(phantom.masks[f"clavicle_{side}"], x, y)
            assert 0 < lateral(side) * (x - midline) < 0.1 * SIZE
            assert y < phantom.landmarks["aortic_knob"][1] < phantom.landmarks[f"hilum_{side}"][1]


# --- pose ---------------------------------------------------------------------------------------


def test_shift_moves_image_and_landmarks_together() -> None:
    pose = sample_pose(subject_rng(0, 4, 1), CLEAN)
    dx, dy = 17, -11
    base, moved = upright(4, pose=pose), upright(4, pose=shifted(pose, dx, dy))
    for name in LANDMARK_NAMES:
        assert np.allclose(np.subtract(moved.landmarks[name], base.landmarks[name]), (dx, dy))
    inner = slice(40, SIZE - 40)
    original = base.image[inner, inner].astype(int)
    translated = moved.image[40 + dy:SIZE - 40 + dy, 40 + dx:SIZE - 40 + dx].astype(int)
    assert np.mean(np.abs(original - translated) <= 1) > 0.999


@pytest.mark.parametrize("pose", [Pose(12.0, 0.9, 7.3, -4.1), Pose(-5.0, 1.1, -9.5, 3.2)])
def test_warp_and_landmark_transform_agree(pose: Pose) -> None:
    point = np.array([[81.3, 140.6]])  # canonical pixels
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    blob = np.exp(-((cols - point[0, 0]) ** 2 + (rows - point[0, 1]) ** 2) / (2 * 3.0**2))
    warped = warp(blob, pose)
    centroid = [(warped * (cols)).sum() / warped.sum(), (warped * (rows)).sum() / warped.sum()]
    assert np.allclose(centroid, pose.apply(point, SIZE)[0], atol=0.05)


def test_rotated_landmarks_still_on_their_anatomy() -> None:
    phantom = upright(1, pose=Pose(8.0, 0.95, 10.0, -6.0))
    for side in ("left", "right"):
        x, y = phantom.landmarks[f"hemidiaphragm_dome_{side}"]
        assert mean_around(phantom.image, x, y + 5) > mean_around(phantom.image, x, y - 5)
        assert pixel(phantom.masks[f"clavicle_{side}"], *phantom.landmarks[f"clavicle_head_{side}"])


# --- standard images are pinned; the hard difficulty ---------------------------------------------


def digest(phantom: Phantom) -> str:
    sha = hashlib.sha256(phantom.image.tobytes())
    sha.update(np.round(np.array(list(phantom.landmarks.values())), 6).tobytes())
    return sha.hexdigest()[:16]


@pytest.mark.parametrize(("config", "seed", "subject", "view", "expected"), [
    (PhantomConfig(size=64), 0, 0, 0, "ecc8c52c4bda2259"),
    (PhantomConfig(size=64), 3, 7, 1, "84b43f6775278e46"),
    (PhantomConfig(size=64, bit_depth=16, noise=False), 11, 2, 0, "33929231dbf76a03"),
])
def test_standard_phantoms_are_pinned(config: PhantomConfig, seed: int, subject: int, view: int,
                                      expected: str) -> None:
    """Digests computed before `difficulty` existed: "standard" images and landmarks never change
    without a GENERATOR_VERSION bump. (Should a numpy / scipy upgrade change them, recompute them
    with the previous commit's generator, not with the code under test.)"""
    assert config.difficulty == "standard"
    assert digest(generate_phantom(subject, seed, config, view)) == expected


def test_hard_differs_from_standard_and_is_deterministic() -> None:
    hard = replace(HARD, noise=True)
    first, again = (generate_phantom(4, seed=2, config=hard, view=1) for _ in range(2))
    assert np.array_equal(first.image, again.image) and first.landmarks == again.landmarks
    standard = generate_phantom(4, seed=2, config=PhantomConfig(size=SIZE), view=1)
    assert np.abs(first.image.astype(float) - standard.image).mean() > 5
    assert first.landmarks != standard.landmarks
    with pytest.raises(ValueError, match="difficulty"):
        PhantomConfig(difficulty="easy")


def test_hard_views_share_the_patient_not_the_devices() -> None:
    (first, pose0), (second, pose1) = (subject_geometry(3, 0, HARD, view) for view in (0, 1))
    assert pose0 != pose1
    assert first.lungs == second.lungs and first.heart == second.heart and first.wall == second.wall
    assert first.effusion == second.effusion and first.nodules == second.nodules
    extras = [sample_view_extras(subject_rng(0, 3, 5, view), first, pose, SIZE)
              for view, pose in ((0, pose0), (1, pose1))]
    assert (len(extras[0].wires), extras[0].blades) != (len(extras[1].wires), extras[1].blades)


def spreads(config: PhantomConfig, subjects: int = 60) -> np.ndarray:
    """Standard deviation over subjects of (lung height, soft-tissue thickness, rotation)."""
    values = [(a.lungs["right"].dome_y - a.lungs["right"].apex_y, a.densities.soft, pose.rotation_deg)
              for a, pose in (subject_geometry(s, 0, config) for s in range(subjects))]
    return np.std(values, axis=0)


def test_hard_subjects_vary_much_more() -> None:
    assert np.all(spreads(HARD) > [1.3, 2.0, 1.5] * spreads(CLEAN))
    hard = [subject_geometry(s, 0, HARD) for s in range(60)]
    assert max(abs(pose.shift_x) for _, pose in hard) > CLEAN.max_shift * SIZE
    assert 5 <= sum(anatomy.effusion is not None for anatomy, _ in hard) <= 30
    assert sum(len(anatomy.nodules) > 0 for anatomy, _ in hard) >= 20


def test_hard_landmarks_inside_the_image() -> None:
    for subject in range(80):
        anatomy, pose = subject_geometry(subject, 0, HARD)
        xy = np.array(list(image_landmarks(anatomy, pose, SIZE).values()))
        assert np.all((xy > 0.02 * SIZE) & (xy < 0.98 * SIZE)), subject
    rendered = generate_phantom(5, config=HARD)
    assert rendered.landmarks == image_landmarks(*subject_geometry(5, 0, HARD), SIZE)


def hard_upright(subject: int, anatomy: Anatomy | None = None) -> Phantom:
    """Hard subject `subject` (seed 0), or a variant of its anatomy, upright, with masks."""
    anatomy = anatomy or subject_geometry(subject, 0, HARD)[0]
    acquisition = sample_acquisition(subject_rng(0, subject, 2))
    return render_phantom(anatomy, Pose(), acquisition, HARD, subject_rng(0, subject, 3), True)


def relative_lung_height(anatomy: Anatomy) -> float:
    return (anatomy.lungs["right"].dome_y - anatomy.lungs["right"].apex_y) / anatomy.size


def test_inspiration_moves_the_domes_and_their_landmarks() -> None:
    """Subjects breathing in deeper or shallower than their standard twin (relative to thorax size):
    the dome landmark stays on the lung's lower edge, upright and in the hard view's pose."""
    shifts = {s: relative_lung_height(subject_geometry(s, 0, HARD)[0])
              - relative_lung_height(subject_geometry(s, 0, CLEAN)[0]) for s in range(12)}
    chosen = [min(shifts, key=shifts.get), max(shifts, key=shifts.get)]
    assert shifts[chosen[0]] < -0.03 and shifts[chosen[1]] > 0.03
    for subject in chosen:
        posed = generate_phantom(subject, 0, HARD, 0, with_masks=True)
        for phantom, tolerance in ((hard_upright(subject), 2), (posed, 3)):
            for side in ("left", "right"):
                x, y = phantom.landmarks[f"hemidiaphragm_dome_{side}"]
                assert pixel(phantom.masks[f"lung_{side}"], x, y - 0.02 * SIZE)
                assert pixel(phantom.masks["abdomen"], x, y + 0.02 * SIZE)
                lung_column = phantom.masks[f"lung_{side}"][:, int(x)]
                assert abs(np.nonzero(lung_column)[0].max() + 1 - y) < tolerance, (subject, side)


def heart_width(subject: int, config: PhantomConfig) -> float:
    anatomy = subject_geometry(subject, 0, config)[0]
    return anatomy.heart[2] / anatomy.size


def test_cardiomegaly_heart_borders_sit_on_the_larger_heart() -> None:
    enlarged = [s for s in range(20) if heart_width(s, HARD) > 1.15 * heart_width(s, CLEAN)]
    assert enlarged
    phantom = hard_upright(enlarged[0])
    heart_columns = np.nonzero(phantom.masks["heart"].any(axis=0))[0]
    for side, extreme in (("right", heart_columns.min()), ("left", heart_columns.max() + 1)):
        x, y = phantom.landmarks[f"heart_border_{side}"]
        assert abs(extreme - x) < 2
        out = lateral(side) * 0.025 * SIZE
        assert pixel(phantom.masks["heart"], x - out, y) and pixel(phantom.masks[f"lung_{side}"], x + out, y)
        assert mean_around(phantom.image, x + out, y) < mean_around(phantom.image, x - out, y) - 20


def test_effusion_fills_the_costophrenic_recess_without_moving_landmarks() -> None:
    subject = next(s for s in range(20) if subject_geometry(s, 0, HARD)[0].effusion is not None)
    anatomy = subject_geometry(subject, 0, HARD)[0]
    wet, dry = hard_upright(subject), hard_upright(subject, replace(anatomy, effusion=None))
    assert wet.landmarks == dry.landmarks
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    brighter = {}
    for side in ("left", "right"):
        x, y = wet.landmarks[f"costophrenic_angle_{side}"]
        recess = wet.masks[f"lung_{side}"] & (np.hypot(cols - x, rows - y) < 0.05 * SIZE)
        brighter[side] = float(wet.image[recess].mean()) - float(dry.image[recess].mean())
    other = "left" if anatomy.effusion.side == "right" else "right"
    assert brighter[anatomy.effusion.side] > 15 and abs(brighter[other]) < 3


def test_nodules_are_round_densities_inside_the_lungs() -> None:
    subject = next(s for s in range(20) if len(subject_geometry(s, 0, HARD)[0].nodules) >= 2)
    anatomy = subject_geometry(subject, 0, HARD)[0]
    with_nodules, without = hard_upright(subject), hard_upright(subject, replace(anatomy, nodules=()))
    lungs = with_nodules.masks["lung_left"] | with_nodules.masks["lung_right"]
    for x, y, _, _ in anatomy.nodules:
        centre = (x * SIZE, y * SIZE)
        assert pixel(lungs, *centre)
        assert mean_around(with_nodules.image, *centre, 1) > mean_around(without.image, *centre, 1) + 5


def test_devices_and_collimation_spare_the_landmarks() -> None:
    views = [(s, v) for s in range(6) for v in range(2)]
    for subject, view in views:
        anatomy, pose = subject_geometry(subject, 0, HARD, view)
        extras = sample_view_extras(subject_rng(0, subject, 5, view), anatomy, pose, SIZE)
        shutter = collimator_mask(extras.blades, SIZE)
        assert all(pixel(shutter, x, y) == 0 for x, y in image_landmarks(anatomy, pose, SIZE).values())
    subject, view = 3, 0  # a nasogastric tube and ECG leads, dark shutter on the left and right edges
    anatomy, pose = subject_geometry(subject, 0, HARD, view)
    extras = sample_view_extras(subject_rng(0, subject, 5, view), anatomy, pose, SIZE)
    assert extras.wires and extras.electrodes and extras.blades and extras.dark_shutter
    acquisition = sample_acquisition(subject_rng(0, subject, 2, view))
    plain, fitted = (render_phantom(anatomy, pose, acquisition, HARD, subject_rng(0, subject, 3), False, e)
                     for e in (None, extras))
    shutter = collimator_mask(extras.blades, SIZE)
    assert np.all(fitted.image[shutter == 1] == 0) and plain.image[shutter == 1].mean() > 10
    open_field = shutter == 0
    assert np.mean(fitted.image[open_field].astype(int) > plain.image[open_field].astype(int) + 10) > 0.002
    assert fitted.landmarks == plain.landmarks


def test_bright_collimation_blocks_the_beam() -> None:
    for subject in range(6):
        anatomy, pose = subject_geometry(subject, 0, HARD)
        extras = sample_view_extras(subject_rng(0, subject, 5), anatomy, pose, SIZE)
        if extras.blades and not extras.dark_shutter:
            break
    phantom = generate_phantom(subject, 0, HARD)
    shutter = collimator_mask(extras.blades, SIZE)
    assert phantom.image[shutter == 1].mean() > 220


def test_hard_sets_record_their_difficulty(tmp_path: Path) -> None:
    config = PhantomConfig(size=64, difficulty="hard")
    write_phantom_set(tmp_path / "api", 1, seed=3, config=config)
    assert json.loads((tmp_path / "api" / "phantoms.json").read_text())["config"]["difficulty"] == "hard"
    out = tmp_path / "cli"
    assert ace(["data", "phantoms", "--n", "2", "--out", str(out), "--size", "64",
                "--difficulty", "hard"]) == 0
    assert json.loads((out / "phantoms.json").read_text())["config"]["difficulty"] == "hard"
    items = read_landmark_set(out)
    expected = generate_phantom(1, seed=0, config=config)
    assert np.array_equal(np.asarray(Image.open(items[1].path)), expected.image)
    with pytest.raises(SystemExit):
        ace(["data", "phantoms", "--n", "1", "--out", str(tmp_path / "x"), "--difficulty", "easy"])


# --- files: landmark sets and the CLI -----------------------------------------------------------


def test_cli_writes_the_documented_files_and_they_read_back(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    assert ace(["data", "phantoms", "--n", "2", "--out", str(out), "--size", "96", "--seed", "5",
                "--start-id", "10"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["phantom_00010.png", "phantom_00011.png"]
    assert (out / "landmarks.csv").read_text().splitlines()[0] == "image,landmark,x,y"
    assert (out / "metadata.csv").read_text().splitlines()[0] == "image,image_id,patient_id"
    provenance = json.loads((out / "phantoms.json").read_text())
    assert provenance["subjects"] == [10, 12] and provenance["config"]["size"] == 96
    assert provenance["config"]["difficulty"] == "standard"
    items = read_landmark_set(out)
    assert [item.image_id for item in items] == ["phantom_00010", "phantom_00011"]
    assert items[0].patient_id == "phantom_subject_00010" and items[0].image == "images/phantom_00010.png"
    expected = generate_phantom(11, seed=5, config=PhantomConfig(size=96))
    assert np.array_equal(np.asarray(Image.open(items[1].path)), expected.image)
    for name, xy in expected.landmarks.items():
        assert np.allclose(items[1].points[name], xy, atol=1e-3)


def test_cli_refuses_a_non_empty_directory_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["data", "phantoms", "--n", "1", "--out", str(tmp_path), "--size", "64"]
    (tmp_path / "notes.txt").write_text("mine")
    assert ace(args) == 2
    assert "--force" in capsys.readouterr().err
    assert ace([*args, "--force"]) == 0
    assert (tmp_path / "notes.txt").exists() and len(read_landmark_set(tmp_path)) == 1


def test_views_per_subject_share_a_patient(tmp_path: Path) -> None:
    assert ace(["data", "phantoms", "--n", "1", "--views", "2", "--out", str(tmp_path), "--size", "64"]) == 0
    items = read_landmark_set(tmp_path)
    assert [i.image_id for i in items] == ["phantom_00000_v0", "phantom_00000_v1"]
    assert items[0].patient_id == items[1].patient_id


@pytest.mark.parametrize(("content", "message"), [
    ("image,name,x,y\na.png,carina,1,2\n", "lacks column"),
    ("image,landmark,x,y\na.png,carina,one,2\n", "not a number"),
    ("image,landmark,x,y\na.png,carina,1,2\na.png,carina,3,4\n", "twice"),
    ("image,landmark,x,y\n", "no landmark rows"),
])
def test_read_landmark_set_explains_format_errors(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "landmarks.csv").write_text(content)
    with pytest.raises(LandmarkFormatError, match=message):
        read_landmark_set(tmp_path, check_images=False)


def test_read_landmark_set_accepts_json(tmp_path: Path) -> None:
    entry = {"image": "a.png", "patient_id": "p1", "landmarks": {"carina": [10.5, 20.25]}}
    (tmp_path / "landmarks.json").write_text(json.dumps({"images": [entry]}))
    [item] = read_landmark_set(tmp_path, check_images=False)
    assert item.points == {"carina": (10.5, 20.25)} and item.patient_id == "p1" and item.image_id == "a"
    (tmp_path / "landmarks.json").write_text(json.dumps({"images": [{"image": "a.png"}]}))
    with pytest.raises(LandmarkFormatError, match="not a landmark file"):
        read_landmark_set(tmp_path, check_images=False)
    (tmp_path / "landmarks.json").write_text(json.dumps({"images": [{**entry, "landmarks": {"c": [1]}}]}))
    with pytest.raises(LandmarkFormatError, match="must be"):
        read_landmark_set(tmp_path, check_images=False)


def test_read_landmark_set_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ace data phantoms"):
        read_landmark_set(tmp_path)
    (tmp_path / "landmarks.csv").write_text("image,landmark,x,y\nimages/a.png,carina,1,2\n")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        read_landmark_set(tmp_path)
    items = read_landmark_set(tmp_path, check_images=False)
    assert items[0].image_id == "a" and items[0].patient_id is None


def test_demo_data_has_phantoms_and_real_samples(tmp_path: Path) -> None:
    from training.cmd_data import build_demo_data

    paths = build_demo_data(tmp_path, n_phantoms=2, seed=0, size=64)
    assert len(read_landmark_set(paths["phantoms"])) == 2
    names = sorted(p.name for p in paths["samples"].iterdir())
    assert names == ["RG1_UNCR.dcm", "metadata.csv", "retina.png"]
    assert "sample_chest_cr" in (paths["samples"] / "metadata.csv").read_text()
    assert build_demo_data(tmp_path, n_phantoms=2, seed=0, size=64) == paths  # kept, not rebuilt


# --- difficulty: naive template matching must fail often ---------------------------------------


@pytest.mark.slow
def test_naive_template_matching_fails_often() -> None:
    config = PhantomConfig(size=512)
    subjects = [generate_phantom(s, seed=123, config=config) for s in range(8)]
    errors = np.concatenate([template_matching_errors(subjects[i], subjects[i + 1]) for i in range(7)])
    failures = float(np.mean(errors > 0.05 * np.hypot(512, 512)))
    print(f"NCC 32x32 template matching: {failures:.0%} of {errors.size} landmarks beyond 5% of the diagonal")
    assert failures > 0.2
