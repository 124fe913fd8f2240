"""Choice of compute device for torch and ONNX Runtime.

Every path that runs a model takes a device option so that an edge device with
a GPU uses it; `auto` picks CUDA when torch sees one and the CPU otherwise.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_torch_device(option: str = "auto") -> torch.device:
    """Map a device option (`auto`, `cpu`, `cuda`, `cuda:N`) to a torch device."""
    option = option.strip().lower()
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if option == "cpu":
        return torch.device("cpu")
    if option == "cuda" or option.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {option!r} requested but torch sees no CUDA device")
        return torch.device(option)
    raise ValueError(f"unknown device {option!r}; expected one of auto, cpu, cuda, cuda:N")


def onnx_providers(option: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for a device option, best first.

    `auto` uses CUDA only when the installed onnxruntime build has it (the
    `gpu` extra); asking for `cuda` explicitly without it is an error rather
    than a silent fall-back to the CPU.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    option = option.strip().lower()
    if option == "cpu":
        return ["CPUExecutionProvider"]
    if option == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    if option == "cuda" or option.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"device {option!r} requested but this onnxruntime has no CUDA provider; "
                "install the `gpu` extra (onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown device {option!r}; expected one of auto, cpu, cuda, cuda:N")
