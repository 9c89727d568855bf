"""`medidiff demo` end to end on the tiny preset: every stage runs and lands in MLflow."""

import json

from tests.helpers import run_cli


def test_demo_runs_every_stage_on_the_tiny_preset(tmp_path, isolated_mlflow):
    out = tmp_path / "demo"
    code, stdout, err = run_cli("demo", "--out", str(out), "--preset", "cpu-tiny",
                                "--subjects", "8", "--set", "train.steps=10")
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) == {"diffusion", "zscore", "threshold"}
    for metrics in results.values():
        assert 0 <= metrics["pooled_ap"] <= 1
        assert metrics["n_cases"] == 2
    assert results["diffusion"]["nfe_per_slice"] == 4 and results["zscore"]["nfe_per_slice"] == 0
    for method in results:
        assert (out / "scores" / method / "scores.csv").is_file()
    assert "diffusion" in stdout and "mlflow ui" in err

    from medidiff.tracking import search_runs

    runs = search_runs("medidiff", uri=isolated_mlflow, max_runs=200)
    demo = [r for r in runs if r["name"] == "demo"]
    assert demo, "no demo run"
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == demo[0]["run_id"]]
    stages = {r["tags"].get("stage") for r in children}
    assert {"train", "score", "evaluate"} <= stages
