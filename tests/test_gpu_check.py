"""benchmarks/gpu_check.py runs on a CPU too: here on the tiny pair, float32 and bfloat16 side by side."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark scripts import their shared `common`


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_a_cpu_and_saves_a_stamped_table(llama_dirs, tmp_path, capsys):
    large, small = llama_dirs
    out = tmp_path / "check.json"
    code = load_script().main(["--device", "cpu", "--dtypes", "float32,bfloat16", "--large", str(large),
                               "--small", str(small), "--prompts", "3", "--max-new-tokens", "10", "--out", str(out)])
    assert code == 0  # 0: lossless BiLD was exact in every dtype
    table = capsys.readouterr().out
    assert "lossless speedup" in table and "float32" in table and "bfloat16" in table
    stamped = json.loads(out.read_text())
    result = stamped["results"]
    assert [row["dtype"] for row in result["rows"]] == ["float32", "bfloat16"]
    for row in result["rows"]:
        assert row["lossless_exact"] and row["lossless_equal_to_vanilla"] == 3 == row["prompts"]
        assert row["bild_speedup"] > 0 and row["lossless_speedup"] > 0 and row["vanilla_tokens_per_s"] > 0
    provenance = stamped["provenance"]
    assert set(provenance) >= {"git", "date_utc", "versions", "drafter_weights_sha256", "cpu_count", "torch_threads"}
    assert result["device"]["device"] == "cpu" and result["device"]["device_name"]
    assert len(result["per_prompt"]["bfloat16"]) == 3


def test_gpu_check_names_a_missing_device(capsys):
    if torch.cuda.is_available():
        return
    assert load_script().main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
