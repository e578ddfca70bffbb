"""One embedding policy: where an encoder runs, at which precision, and its batched forward pass.

The service's inference worker, index building and `ace eval` all embed through an
`EmbeddingPolicy`, so corpus vectors and query vectors are computed alike:
    device     auto (CUDA when visible, else the CPU) | cpu | cuda (an error when none is visible)
    precision  fp32 on the CPU; on CUDA bf16 autocast where the GPU supports it, else fp16;
               autocast=False keeps fp32 on CUDA too
Outputs are float32 on the CPU whatever the device and precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

from ace_model.encoder import Embeddings, Encoder
from ace_model.errors import InputError, UserError
from ace_model.preprocess import normalise

DEVICES = ("auto", "cpu", "cuda")
Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceUnavailableError(UserError, RuntimeError):
    """CUDA was asked for on a machine where torch sees no CUDA device."""


def resolve_device(requested: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """auto | cpu | cuda -> a torch device; local_rank picks a torchrun process's own GPU."""
    requested = requested or "auto"
    if requested not in DEVICES:
        raise InputError(f"unknown device {requested!r}; use one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise DeviceUnavailableError("CUDA was requested but torch sees no CUDA device; use device cpu or "
                                     "auto (--device, ACE_DEVICE), or check the driver and "
                                     "CUDA_VISIBLE_DEVICES")
    if requested == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)


def choose_precision(device: torch.device, autocast: bool = True) -> Precision:
    if device.type != "cuda" or not autocast:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass(frozen=True)
class EmbeddingPolicy:
    device: torch.device
    precision: Precision

    @classmethod
    def resolve(cls, device: str | None = "auto", autocast: bool = True, local_rank: int | None = None
                ) -> EmbeddingPolicy:
        """The policy for a requested device; autocast=False forces fp32 on CUDA."""
        resolved = resolve_device(device, local_rank)
        return cls(resolved, choose_precision(resolved, autocast))

    def describe(self) -> dict[str, str]:
        """What an index manifest or a report records about how its vectors were computed."""
        return {"device": self.device.type, "precision": self.precision}

    def place(self, encoder: Encoder) -> Encoder:
        """Move the encoder to the policy's device (in place) in eval mode."""
        return encoder.to(self.device).eval()

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.precision == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision]):
            yield

    @torch.inference_mode()
    def forward(self, encoder: Encoder, images: torch.Tensor) -> Embeddings:
        """(B, 3, S, S) uint8 letterboxed pixels -> Embeddings: coarse (B, h, w, D), global (B, D),
        fine (B, H, W, d) or None, float32 on the CPU. The encoder must already be on the device
        (`place`). Pixels travel as uint8 (a quarter of float32's bytes) and are normalised on the
        device, in one batched operation."""
        pixels = images.pin_memory() if self.device.type == "cuda" else images
        inputs = normalise(pixels.to(self.device, non_blocking=True), encoder.spec.pixel_mean,
                           encoder.spec.pixel_std)
        with self.autocast():
            out = encoder(inputs)
        fine = None if out.fine is None else out.fine.float().cpu()
        return Embeddings(out.patches.float().cpu(), out.global_.float().cpu(), fine)

    def embed(self, encoder: Encoder, tensors: Sequence[torch.Tensor], batch_size: int = 8,
              progress: str | None = None) -> Embeddings:
        """(3, S, S) uint8 tensors in forward passes of batch_size -> the Embeddings of all of them."""
        starts = tqdm(range(0, len(tensors), batch_size), desc=progress, leave=False, unit="batch",
                      disable=progress is None)
        outs = [self.forward(encoder, torch.stack(list(tensors[i : i + batch_size]))) for i in starts]
        fines = [out.fine for out in outs if out.fine is not None]
        fine = torch.cat(fines) if len(fines) == len(outs) else None
        return Embeddings(torch.cat([o.patches for o in outs]), torch.cat([o.global_ for o in outs]), fine)
