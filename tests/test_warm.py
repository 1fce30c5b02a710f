"""vlmd.kernels.warm: which FlashInfer modules a model needs compiled ahead, and the processes
that compile them (their failures are reported, never raised). Compiling itself needs a GPU: the
GPU tests run with the modules it compiled (`python -m vlmd.kernels.warm` before them)."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from vlmd.kernels.warm import Precompile, model_jobs


def test_a_model_needs_its_prefill_decode_ops_and_vit_modules():
    # InternVL3-8B: Qwen2-7B (28 / 4 heads of 128: tensor-core decode), InternViT-300M (64).
    assert model_jobs(128, 28, 4, torch.bfloat16, 64) == [
        "prefill:bf16:128",
        "decode-tc:bf16:128",
        "ops",
        "prefill:bf16:64",
    ]
    # A GQA group under 4 decodes on CUDA cores; a ViT of the LM's head dim shares its module.
    assert model_jobs(64, 4, 2, torch.float16, 64) == ["prefill:fp16:64", "decode:fp16:64", "ops"]
    assert model_jobs(128, 32, 8, torch.bfloat16, None) == ["prefill:bf16:128", "decode-tc:bf16:128", "ops"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a job that fails: no CUDA here")
def test_a_failed_job_is_logged_and_the_others_still_reported(caplog):
    caplog.set_level(logging.WARNING, logger="vlmd.kernels")
    started = time.monotonic()
    precompile = Precompile(["ops", "decode:bf16:64"])
    summary = precompile.wait()
    assert summary == "ops failed, decode:bf16:64 failed"
    assert time.monotonic() - started < 60
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("kernel precompile" in m and "failed (exit 1)" in m for m in messages)
    assert all("Error" in m for m in messages)  # the end of the child's traceback
    precompile.stop()  # reaped already: nothing to kill


def test_jobs_past_the_timeout_are_killed_and_reported(caplog):
    caplog.set_level(logging.WARNING, logger="vlmd.kernels")
    precompile = Precompile(["ops"])
    assert precompile.wait(timeout_s=0) == "ops failed"
    assert precompile.jobs[0].process.returncode == -9  # killed, not ended by its own failure
    assert "failed (exit -9)" in caplog.records[0].getMessage()


def test_stop_kills_jobs_still_running():
    precompile = Precompile(["ops"])
    precompile.stop()
    assert all(job.process.returncode is not None for job in precompile.jobs)


def test_a_job_ends_with_the_process_that_started_it(tmp_path):
    """A job asked to watch a process that is gone already ends at once."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "vlmd.kernels.warm", "--one", "ops", "--parent", "1"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1 and b"Traceback" not in done.stderr


def test_the_worker_precompiles_on_rank_0_what_its_model_needs(monkeypatch, model_dir):
    """start_precompile's choices, with FlashInfer taken as usable and the processes recorded."""
    from types import SimpleNamespace

    from vlmd.actors import worker
    from vlmd.models.config import InternVLArch

    monkeypatch.setattr(worker, "flashinfer_unsupported_reason", lambda *a: None)
    monkeypatch.setattr(worker, "Precompile", lambda jobs: jobs)
    demo = InternVLArch.from_model_dir(model_dir)  # 4 / 2 heads of 64; a ViT of head dim 16 (SDPA)
    vit128 = InternVLArch(**{**demo.__dict__, "vision_hidden_size": 128 * demo.vision_num_attention_heads})
    assert vit128.vision_head_dim == 128

    cuda = torch.device("cuda", 0)

    def choose(arch=demo, rank=0, device=cuda, **flags):
        args = {
            "disable_kernel_precompile": False,
            "enable_multimodal": True,
            "vit_attention": "auto",
        } | flags
        launch = SimpleNamespace(args=SimpleNamespace(**args), runtime=SimpleNamespace(dtype="bfloat16"))
        return worker.start_precompile(launch, rank, arch, device)

    lm = ["prefill:bf16:64", "decode:bf16:64", "ops"]
    assert choose() == lm
    assert choose(vit128) == [*lm, "prefill:bf16:128"]  # the ViT's FlashInfer attention
    assert choose(vit128, vit_attention="sdpa") == choose(vit128, enable_multimodal=False) == lm
    assert choose(rank=1) is None and choose(device=torch.device("cpu")) is None
    assert choose(disable_kernel_precompile=True) is None
