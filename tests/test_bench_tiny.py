"""bench/gpu_bench.py end to end on a tiny CPU model, and the in-memory loaders it builds vlmd from."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

from vlmd.demo import write_demo_model
from vlmd.kernels.attention import BatchLayout, KVCacheSpec, TorchReferenceBackend
from vlmd.models.config import InternVLArch
from vlmd.models.loader import (
    language_model_from_state_dict,
    load_language_model,
    load_vision,
    vision_from_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = 16
IDS = list(range(100, 140))


# --- the benchmark script ----------------------------------------------------------------------


def _run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_gap_profile_says_where_the_device_waited(monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile's idle accounting on made-up GPU activities (start us, end us, name) over two
    steps: back-to-back kernels leave short gaps; the long ones are named by their neighbours."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from gpu_bench import gap_profile

    spans = [
        (0, 10, "gemm"), (11, 20, "norm"), (120, 130, "sample"),  # a 100 us wait after the norm
        (131, 140, "gemm"), (141, 150, "norm"), (200, 210, "sample"),  # and a 50 us one
        (240, 250, "copy"),  # 30 us before a copy
    ]  # fmt: skip
    profile = gap_profile(list(reversed(spans)), num_steps=2)
    assert profile.kernels_per_step == 3.5
    assert profile.gap_ms == pytest.approx((1 + 100 + 1 + 1 + 50 + 30) / 1e3 / 2)
    assert profile.long_gap_ms == pytest.approx(180 / 1e3 / 2)
    assert profile.long_gaps == [("norm", "sample", 0.075, 1.0), ("sample", "copy", 0.015, 0.5)]
    assert "between norm and sample" in profile.summary()


def test_tiny_tp_bench_times_each_rank_count(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    flags = ("--tiny", "--tp", "1", "2", "--batch_sizes", "1", "3", "--prompt_len", "20", "--new_tokens", "5")
    proc = _run_script("bench/tp_bench.py", *flags, "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tp"], r["batch"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for r in rows:
        assert r["step_ms"] > 0 and r["num_decode_steps"] == 5 - 2  # prefill and first decode excluded
        assert r["over_tp1"] == pytest.approx(r["step_ms"] / rows[[1, 3].index(r["batch"])]["step_ms"])
    assert rows[2]["weight_bytes_per_gpu"] < rows[0]["weight_bytes_per_gpu"]  # each rank holds a share
    assert all(r["linear"] == "torch" for r in rows)  # the CPU has no Triton GEMV
    assert "| tp | all-reduce | one-row linears | batch | ms/step | / tp 1 |" in proc.stdout


def test_tiny_decode_attention_bench_times_every_batch(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    flags = ("--tiny", "--batch_sizes", "1", "3", "--context", "40", "--repeats", "2")
    proc = _run_script("bench/decode_attention_bench.py", *flags, "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["ms"]["torch reference"] > 0 and r["roofline_ms"] > 0 for r in rows)
    assert rows[1]["roofline_ms"] == pytest.approx(3 * rows[0]["roofline_ms"])  # three caches read
    assert "| batch | torch reference ms | KV read at copy speed, ms |" in proc.stdout


def test_tiny_vit_layout_bench_reports_every_layout(tmp_path: Path) -> None:
    out = tmp_path / "vit.json"
    flags = ("--tiny", "--batch_sizes", "1", "2", "--tiles", "2", "--repeats", "1")
    proc = _run_script("bench/vit_layout_bench.py", *flags, "--json", str(out))
    rates = json.loads(out.read_text())["images_per_s"]
    assert list(rates) == ["one replica, one device", "visual_tp=2", "visual_dp=2"]
    assert all(rate > 0 for layout in rates.values() for rate in layout.values())
    assert "# batch 2: visual_" in proc.stdout and "| visual_dp=2 |" in proc.stdout


def test_tiny_mixed_step_bench_times_every_chunk(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    proc = _run_script("bench/mixed_step_bench.py", "--tiny", "--json", str(out))
    data = json.loads(out.read_text())
    assert [(r["batch"], r["chunk"]) for r in data["rows"]] == [(b, c) for b in (1, 4) for c in (0, 8, 32)]
    assert all(r["step_ms"] > 0 and r["steps"] >= 1 for r in data["rows"])
    assert all(r["over_decode"] == 1.0 for r in data["rows"] if r["chunk"] == 0)
    assert data["prefill_alone_tokens_per_s"] > 0
    assert "| decode rows | chunk tokens | step ms |" in proc.stdout


def test_tiny_vit_beside_bench_times_decode_beside_the_vit_and_a_prefill(tmp_path: Path) -> None:
    out = tmp_path / "beside.json"
    placements = ["alone", "thread_low", "thread_sliced", "prefill_low", "prefill_green"]
    flags = ["--tiny", "--batch_sizes", "1", "--placements", *placements, "--slice_tiles", "1"]
    proc = _run_script(
        "bench/vit_beside_bench.py", *flags, "--vit_sms", "8", "--prefill_tokens", "32", "--json", str(out)
    )
    data = json.loads(out.read_text())
    names = ["alone", "thread_low", "thread_sliced (1 tiles a step)", "prefill_low", "prefill_green (8 SMs)"]
    assert [row["placement"] for row in data["rows"]] == names
    measured = [
        row for row in data["rows"] if row["placement"] != "prefill_green (8 SMs)"
    ]  # no green on CPUs
    assert all(row["step_ms"] > 0 for row in measured)
    assert all(row["vit_tiles_per_s"] > 0 for row in measured[1:])
    assert data["vit_alone_tiles_per_s"] > 0 and data["prefill_alone_tokens_per_s"] > 0
    assert "| 1 | prefill_low |" in proc.stdout and "| 1 | prefill_green (8 SMs) | not run |" in proc.stdout


def test_serve_bench_placements_name_their_serve_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from serve_bench import placement_flags

    base = ["--vit_placement", "process", "--vit_step_tiles", "0"]
    assert placement_flags("process") == base
    assert placement_flags("process/255") == [*base, "--decode_step_prefill_tokens", "255"]
    assert placement_flags("worker:2") == ["--vit_placement", "worker", "--vit_step_tiles", "2"]
    worker = ["--vit_placement", "worker", "--vit_step_tiles", "0", "--vit_sms", "32"]
    assert placement_flags("worker@32/128") == [*worker, "--decode_step_prefill_tokens", "128"]
    assert placement_flags("worker@32+64") == [*worker, "--prefill_sms", "64"]


def test_serve_bench_sums_the_servers_stall_lines_by_kind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each kind of stall line (its figures masked) with its count and longest: a late step's
    delay, not its step ids; the allocator's count, not milliseconds."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from serve_bench import report_stalls

    log = tmp_path / "serve.log"
    log.write_text(
        "t worker0 INFO stall: step 12 launched 20.5 ms after decode step 11\n"
        "t worker0 INFO stall: step 40 launched 31.0 ms after decode step 39\n"
        "t worker0 INFO slow host work: launching step 7 took 16.2 ms\n"
        "t worker0 INFO stall: the CUDA allocator since the last flush: {'num_device_alloc': 11}\n"
        "t worker0 INFO stall: the threads' stacks 15 ms into launching step 9 are on stderr; it took 41.5 ms\n"
        "t scheduler INFO stall: scheduler0's garbage collection of generation 2 (1089 objects collected) took 31.2 ms\n"
        "t worker0 INFO a line that is no stall\n"
    )
    report_stalls(log)
    err = capsys.readouterr().err
    assert "6 stall line(s)" in err
    assert "2 x step N launched N ms after decode step N (longest 31.0 ms)" in err
    assert "1 x launching step N took N ms (longest 16.2 ms)" in err
    assert "{'num_device_alloc': N} (at most 11)" in err
    assert "stacks N ms into launching step N are on stderr; it took N ms (longest 41.5 ms)" in err
    assert "garbage collection of generation N (N objects collected) took N ms (longest 31.2 ms)" in err
    assert "no stall" not in err


def test_serve_bench_finds_the_stall_lines_logged_during_each_gap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A gap's lines: those logged from the token before it to 2 ms after its own, no others."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from serve_bench import stalls_in_gaps

    log = tmp_path / "serve.log"
    log.write_text(
        "2026-12-08 00:23:58,880      http INFO stall: http0's event loop was held 18.0 ms\n"
        "2026-12-08 00:23:58,905      http INFO stall: http0's event loop was held 12.0 ms\n"
        "2026-12-08 00:23:58,906   worker0 INFO a line that is no stall\n"
        "2026-12-08 00:23:58,908   worker0 INFO slow host work: launching step 7 took 16.2 ms\n"
        "2026-12-08 00:23:58,910 scheduler INFO stall: scheduler0's event loop was held 11.0 ms\n"
        "2026-12-08 00:24:09,240   worker0 INFO stall: step 12 launched 20.5 ms after decode step 11\n"
    )
    gaps = [
        {"itl_ms": 26.7, "arrived": "00:23:58.907"},  # from 58.880 (its token before) to 58.909
        {"itl_ms": 5.0, "arrived": "00:24:00.000"},
    ]
    near, none = stalls_in_gaps(log, gaps)
    assert near == [
        "http INFO stall: http0's event loop was held 18.0 ms",
        "http INFO stall: http0's event loop was held 12.0 ms",
        "worker0 INFO slow host work: launching step 7 took 16.2 ms",
    ]
    assert none == []


def test_cold_start_bench_times_each_start_on_its_own_caches(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "cold.json"
    flags = ["--modes", "cold,cold_no_precompile,warm", "--port", "8457", "--json", str(out)]
    proc = _run_script("bench/cold_start_bench.py", "--model_dir", str(model_dir), *flags)
    data = json.loads(out.read_text())
    assert list(data) == ["cold", "cold_no_precompile", "warm"]
    for result in data.values():
        assert result["start_s"] > 0
        assert {"http", "vision", "worker0"} <= set(result["phases"]), result["phases"]
        assert "weights" in result["phases"]["worker0"]
    assert "| cold_no_precompile |" in proc.stdout and "| worker0 | imports " in proc.stdout
    flags = ["--modes", "as_is", "--load_workers", "1", "2", "--port", "8457", "--json", str(out)]
    _run_script("bench/cold_start_bench.py", "--model_dir", str(model_dir), *flags)
    assert list(json.loads(out.read_text())) == ["as_is, LOADWORKER=1", "as_is, LOADWORKER=2"]


def test_tiny_bench_prints_every_metric_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_bench.py", "--tiny", "--layouts", "--rounds", "2", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr

    stdout = proc.stdout
    for line in (
        "| batch | vlmd ms/step | vlmd ms/step, no overlap | vlmd ms/step, sampled | vlmd kernel ms "
        "| GPU idle share | transformers ms/step | roofline ms | vlmd / roofline | transformers / roofline "
        "| vlmd tokens/s |",
        "| metric | vlmd | transformers | vlmd / transformers |",
        "| target | measured | goal | result |",
        "| batch | OpenGVLab ms/step | HF-native ms/step | OpenGVLab / HF-native | roofline ms ",
        "# command: python bench/gpu_bench.py --tiny --layouts --rounds 2 --json",
    ):
        assert line in stdout, stdout
    for label in (
        "TTFT ms, 1 tile",
        "ViT tiles/s at batch 2",
        "copy bandwidth",
        "torch ",
        "flashinfer ",
        "Decode at batch 1 beside a ViT process on the same device",
    ):
        assert label in stdout, stdout
    for name in (
        "batch-1 step / roofline",
        "batch-64 step / roofline",
        "ViT tiles/s, vlmd / transformers",
        "TTFT, vlmd / transformers",
        "batch-64 step, every row sampled / greedy",
    ):
        assert f"| {name} |" in stdout, stdout
    # The decode table's rows and the layout table's (its first and last batch).
    assert [line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| 1 |")] == [
        "1",
        "1",
    ]
    assert sum(line.startswith("| 4 |") for line in stdout.splitlines()) == 2

    data = json.loads(out.read_text())
    assert data["meta"]["batch_sizes"] == [1, 4] and data["meta"]["command"].startswith("python ")
    layouts = data["layouts"]["rows"]
    assert [row["batch"] for row in layouts] == [1, 4]
    assert all(len(row["opengvlab_rounds_ms"]) == len(row["hf_rounds_ms"]) == 2 for row in layouts)
    assert data["copy_bandwidth_bytes_per_s"] > 0 and data["lm_weight_bytes"] > 0
    assert [row["batch"] for row in data["decode"]] == [1, 4]
    for row in data["decode"]:
        # Excluded: the prefill step and the first decode step (it waits for the prefill).
        assert row["num_decode_steps"] == data["meta"]["new_tokens"] - 2
        for key in (
            "vlmd_step_ms",
            "vlmd_serial_step_ms",
            "vlmd_sampled_step_ms",
            "transformers_step_ms",
            "roofline_ms",
            "vlmd_over_roofline",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert math.isclose(row["vlmd_over_roofline"], row["vlmd_step_ms"] / row["roofline_ms"])
        assert math.isclose(row["sampled_over_greedy"], row["vlmd_sampled_step_ms"] / row["vlmd_step_ms"])
    assert all(
        data["ttft_ms"][side] > 0 and data["vit_tiles_per_s"][side] > 0 for side in ("vlmd", "transformers")
    )
    assert data["vision_rel_err"] < 1e-5, "vlmd's vision tower does not run transformers' weights"
    beside = data["beside_vit"]  # the other process ran ViT forwards all through the decode
    assert beside["batch"] == 1 and beside["vit_tiles_per_s"] > 0
    assert 0 < beside["step_ms"] <= beside["longest_step_ms"] and beside["alone_step_ms"] > 0
    targets = {t["name"]: t for t in data["targets"]}
    assert len(targets) == 5
    for name in ("batch-64 step / roofline", "batch-64 step, every row sampled / greedy"):
        assert targets[name]["pass"] is None  # batch 64 was not run
    assert isinstance(targets["batch-1 step / roofline"]["pass"], bool)


# --- loading from tensors in memory ------------------------------------------------------------


def _logits(lm, ids: list[int]) -> torch.Tensor:
    arch, num_pages = lm.arch, math.ceil(len(ids) / PAGE_SIZE)
    spec = KVCacheSpec(
        arch.num_hidden_layers,
        num_pages,
        PAGE_SIZE,
        arch.num_key_value_heads,
        arch.head_dim,
        torch.float32,
        torch.device("cpu"),
    )
    attn = TorchReferenceBackend(spec, arch.num_attention_heads, arch.head_dim**-0.5)
    layout = BatchLayout.from_page_tables([0, len(ids)], [len(ids)], [list(range(num_pages))], PAGE_SIZE)
    attn.plan(layout)
    with torch.no_grad():
        return lm.compute_logits(lm(lm.embed(torch.tensor(ids)), torch.tensor(layout.positions()), attn))


@pytest.mark.parametrize("layout", ["hub", "legacy"])
def test_from_state_dict_matches_loading_the_saved_model(tmp_path: Path, layout: str) -> None:
    write_demo_model(tmp_path, key_layout=layout)
    arch = InternVLArch.from_model_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")

    lm = language_model_from_state_dict(arch, state, torch.float32, "cpu")
    expected = _logits(load_language_model(tmp_path, torch.float32, "cpu"), IDS)
    torch.testing.assert_close(_logits(lm, IDS), expected, atol=0, rtol=0)
    embed_key = (
        "model.language_model.embed_tokens.weight"
        if layout == "hub"
        else "language_model.model.embed_tokens.weight"
    )
    assert lm.model.embed_tokens.weight.data_ptr() == state[embed_key].data_ptr(), "copied, not shared"

    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    vision = vision_from_state_dict(arch, state, "float32", "cpu")
    with torch.no_grad():
        expected = load_vision(tmp_path, torch.float32, "cpu")(pixel_values)
        torch.testing.assert_close(vision(pixel_values), expected, atol=0, rtol=0)


def test_from_state_dict_of_a_tied_transformers_model(tmp_path: Path) -> None:
    """What the benchmark does: vlmd built from a live transformers model's state dict."""
    write_demo_model(tmp_path, tie_word_embeddings=True)
    arch = InternVLArch.from_model_dir(tmp_path)
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    lm = language_model_from_state_dict(arch, hf.state_dict(), torch.float32, "cpu")
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    expected = _logits(load_language_model(tmp_path, torch.float32, "cpu"), IDS)
    torch.testing.assert_close(_logits(lm, IDS), expected, atol=0, rtol=0)
    with torch.no_grad():
        hf_logits = hf(input_ids=torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(_logits(lm, IDS), hf_logits, atol=2e-4, rtol=1e-5)


def test_from_state_dict_names_missing_and_foreign_keys(tmp_path: Path) -> None:
    write_demo_model(tmp_path)
    arch = InternVLArch.from_model_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    missing = {k: v for k, v in state.items() if not k.endswith("layers.1.mlp.up_proj.weight")}
    with pytest.raises(ValueError, match=r"missing \[model\.layers\.1\.mlp\.up_proj\.weight\]"):
        language_model_from_state_dict(arch, missing, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unrecognised checkpoint keys"):
        vision_from_state_dict(arch, state | {"extra.weight": torch.zeros(1)}, torch.float32, "cpu")


def test_tiny_host_step_bench_reports_every_context(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    proc = _run_script("bench/host_step_bench.py", "--tiny", "--json", str(out))
    assert "| context | schedule | worker bookkeeping | update | total | vs the first " in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["context"] for row in rows] == [64, 256] and all(row["total"] > 0 for row in rows)


def test_image_bytes_bench_times_both_images_through_the_http_actors_checker() -> None:
    """The bench runs (a few checks of each image, two new images through a preprocess worker)
    and prints a row of figures per image: its bytes, ms per image and images/s above zero, the
    loop's longest hold zero or more; then a row for the new images."""
    args = ("--repeats", "2", "--concurrency", "2", "--new_images", "2")
    proc = _run_script("bench/image_bytes_bench.py", *args)
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and ("PNG" in line or "JPEG" in line)]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        size, ms, held, rate = (float(cell) for cell in row.strip().strip("|").split("|")[1:])
        assert size > 0 and ms > 0 and held >= 0 and rate > 0, row
    header = lines.index("| loop held, longest ms | loop late beyond idle, sum per image ms | images/s |")
    held, _late, rate = (float(cell) for cell in lines[header + 2].strip().strip("|").split("|"))
    assert held >= 0 and rate > 0, lines[header + 2]


def test_prefix_cache_bench_fills_the_cache_and_times_the_collector_and_the_idle_check() -> None:
    """The bench runs (a few image prompts) and prints one row: every prompt's full pages cached
    (206 a prompt), the objects the collector tracks, both timings zero or more."""
    proc = _run_script("bench/prefix_cache_bench.py", "--requests", "3", "--repeats", "2")
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "commit" not in line]
    pages, tracked, collect_ms, check_ms = (float(cell) for cell in row.strip().strip("|").split("|")[1:])
    assert pages == 3 * 206 and tracked > 0 and collect_ms >= 0 and check_ms >= 0, row
