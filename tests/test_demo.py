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

    # what a user browses: key metrics under eval/ and train/, descriptions, data sets, models
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=isolated_mlflow)
    assert demo[0]["tags"]["mlflow.note.content"].startswith("pooled AP on the test scans: ")
    by_stage = {}
    for run in children:
        by_stage.setdefault(run["tags"].get("stage"), []).append(run)
    for run in by_stage["evaluate"]:
        assert {"eval/pooled_ap", "eval/scan_auroc"} <= set(run["metrics"])
        assert run["tags"]["mlflow.note.content"].startswith("pooled AP ")
    for run in by_stage["score"]:
        assert run["tags"]["mlflow.note.content"] == "2 scored, 0 skipped (outputs exist), 0 failed"
    train = by_stage["train"][0]
    assert "train/loss" in train["metrics"]
    assert train["tags"]["mlflow.note.content"].startswith("trained 10 steps in ")
    contexts = {}
    for run in children:
        for item in client.get_run(run["run_id"]).inputs.dataset_inputs:
            context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
            contexts[context] = item.dataset
    assert set(contexts) == {"training", "calibration", "scoring"}
    assert contexts["training"].digest == train["tags"]["data_fingerprint"]
    assert len(contexts["scoring"].digest) == 16 and contexts["scoring"].name == "inputs"
    model = client.get_run(train["run_id"]).outputs.model_outputs
    assert len(model) == 1
    linked = client.get_run(demo[0]["run_id"]).outputs.model_outputs
    assert [o.model_id for o in linked] == [model[0].model_id]
