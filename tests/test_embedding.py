"""ace_model.embedding: device resolution, precision by device, the batched forward pass, and the
`--device` option of `ace index build | add` and `ace eval`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ace_model import index as ix
from ace_model.dense import DENSE_BACKBONE
from ace_model.embedding import DeviceUnavailableError, EmbeddingPolicy, choose_precision, resolve_device
from ace_model.encoder import Encoder, EncoderSpec
from ace_model.errors import UserError
from tests.helpers import DATASET_SIZES as SIZES
from tests.helpers import write_dataset
from training.cli import main

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    Encoder(EncoderSpec("vit_tiny_patch16_224", 64)).save(directory)
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), SIZES)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_and_auto_without_cuda_resolve_to_the_cpu_in_float32(no_cuda: None) -> None:
    for requested in ("cpu", "auto", None):
        assert resolve_device(requested) == torch.device("cpu")
    policy = EmbeddingPolicy.resolve("auto")
    assert policy == EmbeddingPolicy(torch.device("cpu"), "fp32")
    assert policy.describe() == {"device": "cpu", "precision": "fp32"}


def test_cuda_without_a_device_is_a_user_error(no_cuda: None) -> None:
    with pytest.raises(DeviceUnavailableError, match="use device cpu or auto") as caught:
        resolve_device("cuda")
    assert isinstance(caught.value, UserError)
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_precision_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_precision(torch.device("cuda")) == "bf16"
    assert choose_precision(torch.device("cuda"), autocast=False) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_precision(torch.device("cuda")) == "fp16"


def test_local_rank_picks_the_gpu_of_a_torchrun_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


def test_forward_and_batched_embed_agree_in_float32_on_the_cpu() -> None:
    torch.manual_seed(0)
    policy = EmbeddingPolicy.resolve("cpu")
    encoder = policy.place(Encoder(EncoderSpec(DENSE_BACKBONE, 64)))
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    whole = policy.forward(encoder, images)
    assert whole.patches.shape == (5, 4, 4, encoder.dim) and whole.global_.shape == (5, encoder.dim)
    assert whole.fine is not None and whole.fine.shape[:3] == (5, 16, 16)
    for tensor in (whole.patches, whole.global_, whole.fine):
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
    batched = policy.embed(encoder, list(images), batch_size=2)
    torch.testing.assert_close(batched.patches, whole.patches, atol=1e-5, rtol=1e-5)
    assert batched.fine is not None
    torch.testing.assert_close(batched.fine, whole.fine, atol=1e-5, rtol=1e-5)


def test_single_level_encoders_have_no_fine_grid() -> None:
    policy = EmbeddingPolicy.resolve("cpu")
    encoder = policy.place(Encoder(EncoderSpec("vit_tiny_patch16_224", 64)))
    assert policy.embed(encoder, [torch.zeros(3, 64, 64, dtype=torch.uint8)] * 3, batch_size=2).fine is None


def test_index_build_records_how_its_vectors_were_computed(tmp_path: Path, encoder_dir: Path,
                                                            dataset: Path) -> None:
    assert main(["index", "build", "--encoder", str(encoder_dir), "--images", str(dataset),
                 "--out", str(tmp_path), "--workers", "0", "--device", "cpu", "--publish"]) == 0
    build = ix.PatchIndex.open(tmp_path).manifest["build"]
    assert (build["device"], build["precision"]) == ("cpu", "fp32")


@pytest.mark.parametrize("command", [["index", "build"], ["index", "add"], ["eval"]])
def test_cuda_absent_is_one_line_and_exit_2(command: list[str], tmp_path: Path, encoder_dir: Path,
                                            dataset: Path, no_cuda: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    arguments = {
        "build": ["--encoder", str(encoder_dir), "--images", str(dataset), "--out", str(tmp_path)],
        "add": ["--encoder", str(encoder_dir), "--images", str(dataset), "--root", str(tmp_path)],
        "eval": ["--encoder", str(encoder_dir), "--data", str(dataset), "--out", str(tmp_path)],
    }[command[-1]]
    assert main([*command, *arguments, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ace {' '.join(command)}: CUDA was requested") and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_index_build_on_cuda_matches_the_cpu_build(tmp_path: Path, encoder_dir: Path, dataset: Path) -> None:
    common = ["--encoder", str(encoder_dir), "--images", str(dataset), "--workers", "0", "--publish"]
    assert main(["index", "build", *common, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert main(["index", "build", *common, "--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 0
    on_cpu, on_cuda = ix.PatchIndex.open(tmp_path / "cpu"), ix.PatchIndex.open(tmp_path / "cuda")
    assert on_cuda.manifest["build"]["device"] == "cuda"
    assert on_cuda.manifest["build"]["precision"] in ("bf16", "fp16")
    for image_id in on_cpu.image_ids():
        cosines = np.sum(on_cpu.grid(image_id) * on_cuda.grid(image_id), axis=-1)  # unit rows
        assert cosines.min() > 0.98, image_id


def test_the_device_option_knows_the_policy_devices_and_reads_ace_device(monkeypatch: pytest.MonkeyPatch
                                                                        ) -> None:
    from ace_model import embedding
    from training import cli, cmd_options

    assert cmd_options.DEVICES == embedding.DEVICES
    monkeypatch.setenv("ACE_DEVICE", "cpu")
    args = cli.build_parser().parse_args(["index", "build", "--encoder", "e", "--images", "i", "--out", "o"])
    assert (args.device, args.fp32) == ("cpu", False)
