"""The driver check: a CUDA 13 image on an R535-R570 node fails at start naming both versions."""

from __future__ import annotations

import pytest
import torch

from reranker_runtime.engines.cuda_driver import driver_problem, ensure_driver_supported
from reranker_runtime.errors import ModelLoadError


@pytest.mark.parametrize(
    ("driver", "cuda"),
    [
        ("535.183.01", "12.9.1"),  # GKE/EKS R535 with a CUDA 12.x image: minor-version compat
        ("570.172.08", "12.4"),
        ("580.95.05", "13.0.2"),
        ("590.1", "13.1"),
        (None, "13.1"),  # unknown driver: nothing to say (CUDA reports it at first use)
        ("535.104.05", None),
    ],
)
def test_supported(driver: str | None, cuda: str | None) -> None:
    assert driver_problem(driver, cuda) is None


@pytest.mark.parametrize(
    ("driver", "cuda", "needed"),
    [
        ("570.172.08", "13.1.0", "580"),
        ("535.261.03", "13.0", "580"),
        ("520.61.05", "12.2", "525.60.13"),
    ],
)
def test_too_old_names_found_and_needed(driver: str, cuda: str, needed: str) -> None:
    message = driver_problem(driver, cuda)
    assert message is not None
    assert f"driver {driver} is too old for CUDA {cuda}" in message
    assert f"needs driver >= {needed}." in message
    assert "CUDA 12.x TensorRT-LLM release" in message
    with pytest.raises(ModelLoadError, match=f"driver {driver} is too old"):
        ensure_driver_supported(driver, cuda)


def test_gpu_build_refuses_a_too_old_driver(
    monkeypatch: pytest.MonkeyPatch, xlmr_reranker, tmp_path
) -> None:
    from engines.helpers import L4, inputs, mutate_checkpoint
    from reranker_runtime.engine_build import command
    from reranker_runtime.engine_build.errors import GpuMismatchError
    from reranker_runtime.engines import cuda_driver

    monkeypatch.setattr(cuda_driver, "host_driver_version", lambda: "570.172.08")
    monkeypatch.setattr(cuda_driver, "image_cuda_version", lambda: "13.1.0")
    ckpt = mutate_checkpoint(xlmr_reranker, tmp_path / "ckpt", config={"intermediate_size": 128})
    with pytest.raises(
        GpuMismatchError, match=r"driver 570\.172\.08 is too old for CUDA 13\.1\.0"
    ) as err:
        command.run_build(inputs(ckpt, accelerator="L4"), tmp_path / "out", gpu_detector=lambda: L4)
    assert err.value.exit_code == 14
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a node where no GPU is visible")
@pytest.mark.parametrize(
    ("driver", "cuda", "named"),
    [("570.172.08", "13.1.0", "driver 570.172.08 is too old for CUDA 13.1.0"), (None, "13.1", "")],
)
def test_device_cuda_without_a_visible_gpu_names_a_too_old_driver(
    monkeypatch: pytest.MonkeyPatch, driver: str | None, cuda: str, named: str
) -> None:
    """`--device cuda` on a node whose driver CUDA cannot use: PyTorch sees no GPU; the error says
    why, where it can tell."""
    from reranker_runtime.config import ServeSettings
    from reranker_runtime.engines import cuda_driver
    from reranker_runtime.engines.factory import create_engine

    monkeypatch.setattr(cuda_driver, "host_driver_version", lambda: driver)
    monkeypatch.setattr(cuda_driver, "image_cuda_version", lambda: cuda)
    with pytest.raises(ModelLoadError) as err:
        create_engine(ServeSettings(model="unused", device="cuda"))
    message = str(err.value)
    assert message.startswith("--device cuda was requested but no CUDA GPU is visible")
    assert named in message
    assert ("too old" in message) is bool(named)
