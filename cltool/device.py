"""Fitting a run to its device: which device, what the recipe's device options need there
(SyncBatchNorm needs GPUs, ``torch.compile`` on a CPU needs a C++ compiler), compiling the
encoders, and where the training images are kept."""

from __future__ import annotations

import logging
import os
import shutil

import torch

from cltool.errors import InputError, RecipeError
from cltool.nets import Encoder
from cltool.recipe import Recipe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"train.device = {name!r}: no CUDA device here; set train.device = 'cpu'")
    return device


def resident_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Where the steps gather their uint8 training batches from: the GPU itself when the images
    take under a quarter of its free memory (CIFAR-10's 50,000 take 150 MB), so a batch is an
    index on the device rather than a copy from pageable host memory, which holds up the host
    until the transfer is done; elsewhere, host memory, as loaded."""
    if device.type != "cuda":
        return images
    free_bytes, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() > free_bytes // 4:
        return images
    return images.to(device)


def check_sync_bn(recipe: Recipe, world_size: int, device: torch.device) -> None:
    """``model.sync_bn`` across several ranks needs GPUs: torch's SyncBatchNorm refuses CPU
    tensors once a process group is up (with one rank it is plain BatchNorm)."""
    if recipe.model.sync_bn and world_size > 1 and device.type != "cuda":
        raise RecipeError(
            f"model.sync_bn = true: SyncBatchNorm synchronises GPU tensors only, and this run of "
            f"{world_size} ranks is on {device.type}; set model.sync_bn = false (model.bn_splits "
            "gives MoCo's shuffle-BN benefit without GPUs)"
        )


def check_compile(recipe: Recipe, device: torch.device) -> None:
    """``train.compile`` on a CPU has inductor write and build C++ kernels: refuse up front,
    in one line, where no compiler is there to build them."""
    if not recipe.train.compile or device.type != "cpu":
        return
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(name and shutil.which(name) for name in compilers):
        raise RecipeError(
            "train.compile = true: torch.compile on the CPU builds C++ kernels and no C++ "
            "compiler is on PATH; install one (apt-get install g++) or set train.compile = false"
        )


def compile_encoders(method: torch.nn.Module) -> None:
    """Compile every encoder of the method in place (``nn.Module.compile``: the parameters,
    state dict and checkpoints stay those of the plain module). The encoders are where a step's
    time goes; the rest (queues, losses, momentum updates) stays eager, so nothing of the
    method's bookkeeping has to trace. Evaluation reads ``encoder.backbone``, which runs eager."""
    # A CUDA build of torch on a machine without a GPU warns, at the first CPU kernel build,
    # that it found no CUDA runtime: true and irrelevant to CPU kernels.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for module in method.modules():
        if isinstance(module, Encoder):
            module.compile()
