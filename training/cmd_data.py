"""`ace data phantoms | demo`: write synthetic chest radiograph phantoms, or the bundled demo data
(phantoms plus the real sample images that ship inside installed packages)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from training.landmarks import write_metadata_csv
from training.phantom_types import DIFFICULTIES, PhantomConfig

DEMO_PHANTOMS = 24
SAMPLE_DICOM = "RG1_UNCR.dcm"  # a chest CR radiograph in pydicom-data


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("data", help="write phantom or demo data sets",
                                   description="Write landmark data sets (docs/data.md).")
    commands = parser.add_subparsers(dest="data_command", required=True)
    _register_phantoms(commands)
    _register_demo(commands)


def _register_phantoms(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "phantoms", help="synthetic PA chest radiographs with 14 named landmarks",
        description="Write DIR/images/<id>.png, DIR/landmarks.csv (image,landmark,x,y) and "
                    "DIR/metadata.csv (image,image_id,patient_id). Subject k of a seed is always the "
                    "same patient, so --start-id gives held-out subjects.",
    )
    parser.add_argument("--n", type=int, required=True, help="number of subjects")
    parser.add_argument("--out", type=Path, required=True, help="output directory (empty or new)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--start-id", type=int, default=0, help="first subject number (default 0)")
    parser.add_argument("--views", type=int, default=1,
                        help="images per subject: same anatomy, new pose and exposure (hard: and new "
                             "devices and collimation) (default 1)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="standard",
                        help="hard: wider pose, body habitus, inspiration depth, cardiomegaly, effusion, "
                             "nodules, tubes and wires, collimation (default standard; docs/data.md)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--force", action="store_true", help="replace phantoms in a non-empty --out")
    parser.set_defaults(func=run_phantoms)


def _register_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo", help="the bundled demo data: phantoms + real sample images",
        description="Write DIR/phantoms (a phantom landmark set) and DIR/samples (a chest CR DICOM "
                    "from pydicom-data and scikit-image's retina photograph, with metadata.csv). "
                    "Parts that already exist are kept.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. $ACE_HOME/data")
    parser.add_argument("--n", type=int, default=DEMO_PHANTOMS, help=f"phantoms (default {DEMO_PHANTOMS})")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--size", type=int, default=512, help="phantom side in pixels (default 512)")
    parser.set_defaults(func=run_demo)


def run_phantoms(args: argparse.Namespace) -> int:
    from training.phantoms import write_phantom_set

    config = PhantomConfig(size=args.size, bit_depth=args.bit_depth, difficulty=args.difficulty)
    out = write_phantom_set(args.out, args.n, args.seed, config, args.start_id, args.views, args.force,
                            args.workers)
    print(f"wrote {args.n * args.views} phantom(s) to {out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    paths = build_demo_data(args.out, args.n, args.seed, args.size)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


def build_demo_data(out_dir: str | Path, n_phantoms: int = DEMO_PHANTOMS, seed: int = 0,
                    size: int = 512) -> dict[str, Path]:
    """Fill out_dir/phantoms and out_dir/samples with whatever is missing; returns both paths."""
    from training.phantoms import write_phantom_set

    out = Path(out_dir)
    phantoms, samples = out / "phantoms", out / "samples"
    if not (phantoms / "landmarks.csv").is_file():
        write_phantom_set(phantoms, n_phantoms, seed, PhantomConfig(size=size), force=True)
    if not (samples / "metadata.csv").is_file():
        write_samples(samples)
    return {"phantoms": phantoms, "samples": samples}


def write_samples(out: Path) -> Path:
    """Copy the real images that installed packages ship: a chest CR DICOM and a fundus photo."""
    import pydicom
    from PIL import Image
    from skimage import data as skimage_data

    out.mkdir(parents=True, exist_ok=True)
    dicom = _sample_dicom_path()
    shutil.copyfile(dicom, out / SAMPLE_DICOM)
    patient = str(pydicom.dcmread(dicom, stop_before_pixels=True).get("PatientID", "")) or None
    Image.fromarray(skimage_data.retina()).save(out / "retina.png")
    write_metadata_csv(out / "metadata.csv", [
        (SAMPLE_DICOM, "sample_chest_cr", patient),
        ("retina.png", "sample_retina", None),
    ])
    return out


def _sample_dicom_path() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(SAMPLE_DICOM)
    if path is None:
        raise FileNotFoundError(f"{SAMPLE_DICOM} not found: install the pydicom-data package "
                                "(pip install pydicom-data)")
    return Path(str(path))
