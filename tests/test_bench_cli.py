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
    md = tmp_path / "all.md"
    rc = bench.main(["--merge", str(tmp_path / "lora_linear.json"), str(tmp_path / "nf4_linear.json"), "--json", str(merged),
                     "--markdown", str(md)])
    assert rc == 0
    data = json.loads(merged.read_text())
    assert len(data["results"]) == sum(len(p["results"]) for p in parts)
    assert {r["op"] for r in data["results"]} == {"lora_linear", "nf4_linear"}
    assert "nf4_linear" in capsys.readouterr().out
    # The Markdown summary: one row per lora_fused case of each op, its time and a ratio per baseline.
    text = md.read_text()
    ours = [r for r in data["results"] if r["provider"] == "lora_fused"]
    for op in ("lora_linear", "nf4_linear"):
        assert f"## {op}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert len(rows) == len(ours)
    fwd = next(r for r in ours if r["op"] == "lora_linear" and r["mode"] == "fwd")
    assert f"| fwd | 64->40 | 3 | 4 | {fwd['ms']:.4f} | {fwd['speedup']['torch']:.2f}x |" in text
    # Runs from another commit (or GPU, or torch) are refused rather than mixed.
    parts[1]["meta"]["commit"] = "0000000"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(parts[1]))
    with pytest.raises(SystemExit, match="only runs of one GPU, torch and commit merge"):
        bench.main(["--merge", str(tmp_path / "lora_linear.json"), str(other)])


def test_markdown_keeps_chosen_ranks_and_marks_wrong_cases(tmp_path):
    from lora_fused.bench_report import Result, add_speedups, write_markdown

    results = [
        Result("lora_linear", "fwd", "lora_fused", 16, 64, 40, 8, "bf16", ms=0.5),
        Result("lora_linear", "fwd", "torch", 16, 64, 40, 8, "bf16", ms=1.0),
        Result("lora_linear", "fwd", "lora_fused", 16, 64, 40, 16, "bf16", ms=None, status="WRONG", detail="err 0.3"),
        Result("lora_linear", "fwd", "torch", 16, 64, 40, 16, "bf16", ms=1.0),
    ]
    add_speedups(results)
    path = tmp_path / "s.md"
    write_markdown(results, {}, {"device_name": "X"}, str(path))
    text = path.read_text()
    assert "| fwd | 64->40 | 16 | 8 | 0.5000 | 2.00x |" in text
    assert "| fwd | 64->40 | 16 | 16 | - | WRONG |" in text
    write_markdown(results, {}, {"device_name": "X"}, str(path), ranks={16})
    assert "| 8 |" not in path.read_text()


def test_plot_has_a_panel_per_op_and_mode(tmp_path):
    pytest.importorskip("matplotlib")
    from lora_fused.bench_report import Result, add_speedups, write_plot

    results = []
    for op, r in (("lora_linear", 16), ("nf4_linear", 0)):
        for M in (1, 16):
            for mode in ("fwd", "fwdbwd"):
                results += [Result(op, mode, "lora_fused", M, 64, 40, r, "bf16", ms=1.0),
                            Result(op, mode, "base_gemm", M, 64, 40, r, "bf16", ms=0.5 * M)]
    add_speedups(results)
    path = tmp_path / "p.png"
    assert write_plot(results, str(path)) == f"plot written to {path}"
    import matplotlib.image

    h, w = matplotlib.image.imread(str(path)).shape[:2]
    assert w > h  # 2 ops x 2 modes: a 2 x 2 grid of 5.5 x 4.2 inch panels
    assert abs(w / h - (2 * 5.5) / (2 * 4.2)) < 0.05
