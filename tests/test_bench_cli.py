"""The benchmark CLI: runs on CPU, writes the documented JSON, and reports a wrong provider as WRONG."""

import json

import pytest

import torch

from lora_fused import bench


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--M", "3", "--r", "4", "--shapes", "48:40", "--no-peft", "--no-bnb",
                     "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_cpu_quick_run_writes_documented_json(tmp_path, capsys):
    rc, data = _run(tmp_path)
    assert rc == 0
    assert "say nothing about GPU speed" in capsys.readouterr().out
    assert {"meta", "ceilings", "args", "results"} <= set(data)
    for key in ("date", "device_name", "torch", "lora_fused", "commit", "build"):
        assert key in data["meta"]
    ours = [r for r in data["results"] if r["provider"] == "lora_fused" and r["op"] == "lora_linear"]
    assert {r["mode"] for r in ours} == {"fwd", "bwd", "fwdbwd"}
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["rel_err"] is not None
    assert all("torch" in r["speedup"] for r in ours)


def test_wrong_provider_is_reported_wrong_not_timed(tmp_path, monkeypatch):
    real = bench.lora_linear_providers

    def with_broken(x, weight, lora_A, lora_B, scaling, alpha, with_peft):
        providers = real(x, weight, lora_A, lora_B, scaling, alpha, with_peft)
        fwd, params = providers["torch"]
        providers["broken"] = (lambda: fwd() * 1.5, params)  # a fast, wrong answer
        return providers

    monkeypatch.setattr(bench, "lora_linear_providers", with_broken)
    rc, data = _run(tmp_path, "--ops", "lora_linear", "--modes", "fwd")
    assert rc == 1
    broken = [r for r in data["results"] if r["provider"] == "broken"]
    assert broken and all(r["status"] == "WRONG" and r["ms"] is None for r in broken)
    assert all(r["status"] == "ok" for r in data["results"] if r["provider"] != "broken")
    assert torch.isfinite(torch.tensor([r["ms"] for r in data["results"] if r["ms"] is not None])).all()


def test_split_runs_merge_into_one_table(tmp_path, capsys):
    parts = []
    for op in ("lora_linear", "nf4_linear"):
        out = tmp_path / f"{op}.json"
        assert bench.main(["--device", "cpu", "--ops", op, "--M", "3", "--r", "4", "--shapes", "64:40", "--no-peft",
                           "--no-bnb", "--json", str(out)]) == 0
        parts.append(json.loads(out.read_text()))
    merged = tmp_path / "all.json"
    capsys.readouterr()
    rc = bench.main(["--merge", str(tmp_path / "lora_linear.json"), str(tmp_path / "nf4_linear.json"), "--json", str(merged)])
    assert rc == 0
    data = json.loads(merged.read_text())
    assert len(data["results"]) == sum(len(p["results"]) for p in parts)
    assert {r["op"] for r in data["results"]} == {"lora_linear", "nf4_linear"}
    assert "nf4_linear" in capsys.readouterr().out
    # Runs from another commit (or GPU, or torch) are refused rather than mixed.
    parts[1]["meta"]["commit"] = "0000000"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(parts[1]))
    with pytest.raises(SystemExit, match="only runs of one GPU, torch and commit merge"):
        bench.main(["--merge", str(tmp_path / "lora_linear.json"), str(other)])
