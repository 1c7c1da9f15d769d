"""benchmarks/: the harness (interleaving, records, table, plot) and the comparisons' own checks, on tiny
models. Fast; never asserts on timing."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hf_vlm.testing import require

require("open_clip", "pip install open_clip_torch  (a dev dependency: pip install -e '.[dev]')")
require("matplotlib", "pip install matplotlib  (a dev dependency: pip install -e '.[dev]')")

from benchmarks import bench_blip2, bench_coca, bench_loader, harness, report  # noqa: E402


def test_interleaved_alternates_ours_and_upstream_and_stops_at_the_repeat_count():
    calls = []
    timing = harness.interleaved(lambda: calls.append("ours"), lambda: calls.append("upstream"),
                                 device=torch.device("cpu"), repeats=3, budget_s=1e9, warmup=1)
    assert calls == ["ours", "upstream"] * 4  # one warmup pair, then three timed pairs
    assert len(timing.ours) == len(timing.upstream) == 3


def test_interleaved_runs_at_least_one_pair_when_the_budget_is_spent():
    calls = []
    timing = harness.interleaved(lambda: calls.append("ours"), lambda: calls.append("upstream"),
                                 device=torch.device("cpu"), repeats=5, budget_s=0.0, warmup=0)
    assert calls == ["ours", "upstream"] and len(timing.ours) == 1


def _record(case: str, ours_s: float, upstream_s: float) -> harness.Record:
    timing = harness.Timing(ours=[ours_s, ours_s * 3, ours_s], upstream=[upstream_s])
    return harness.Record(benchmark="coca_generate", case=case,
                          params={"strategy": "greedy", "batch": 2, "new_tokens": 10 if "10" in case else 20,
                                  "model": "tiny", "device": "cpu"},
                          metrics=harness.throughput_metrics(timing, {"images/s": 2, "tokens/s": 40}),
                          seconds=harness.seconds_of(timing), checks={"same_tokens": True})


def test_records_round_trip_and_make_one_table_row_per_metric(tmp_path):
    record = _record("greedy_b2_t20", ours_s=0.5, upstream_s=2.0)
    # medians: ours 0.5 s, upstream 2 s per call of 2 images
    assert record.metrics["images/s"] == {"ours": 4.0, "upstream": 1.0, "ratio": 4.0}
    path = harness.save(record, tmp_path)
    assert path.name == "coca_generate__greedy_b2_t20.json"
    loaded = json.loads(path.read_text())
    assert loaded["seconds"]["ours"] == [0.5, 1.5, 0.5] and "cpu" in loaded["machine"]

    table = harness.markdown_table(harness.load_records(tmp_path)).splitlines()
    assert table[0] == "| benchmark | case | metric | hf-vlm | upstream | ratio | checks |"
    assert len(table) == 2 + 2  # header, separator, images/s and tokens/s
    assert table[2] == "| coca_generate | greedy_b2_t20 | images/s | 4 | 1 | 4 | same_tokens: yes |"


def test_load_records_names_a_file_that_is_not_a_record(tmp_path):
    (tmp_path / "stray.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="stray.json.*missing"):
        harness.load_records(tmp_path)


def test_report_writes_the_table_and_a_png_plot(tmp_path):
    for case, ours_s in (("greedy_b2_t10", 0.2), ("greedy_b2_t20", 0.3)):
        harness.save(_record(case, ours_s=ours_s, upstream_s=1.0), tmp_path)
    assert report.main([str(tmp_path), "--header", "Made by a test."]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "Made by a test." in readme and "| coca_generate | greedy_b2_t10 | tokens/s |" in readme
    assert "![tokens/s vs caption length](plot.png)" in readme
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_tokens_compares_every_token_and_the_shape():
    tokens = torch.tensor([[49406, 5, 6, 7]])
    assert bench_coca.same_tokens(tokens, tokens.clone())
    assert not bench_coca.same_tokens(tokens, torch.tensor([[49406, 5, 9, 7]]))
    assert not bench_coca.same_tokens(tokens, tokens[:, :3])


@pytest.fixture(scope="module")
def tiny_coca():
    cfg = bench_coca.open_clip_cfg(quick=True)
    reference = bench_coca.build_open_clip(cfg).eval()
    return reference, bench_coca.convert_open_clip(reference, cfg).eval()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_upstream_decoding_loops_give_our_generate_tokens_and_catch_a_changed_model(tiny_coca, num_beams):
    reference, ours = tiny_coca
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if num_beams == 1:
        expected = bench_coca.open_clip_greedy(reference, images, 4)
    else:
        expected = bench_coca.open_clip_beam_search(reference, images, 4, num_beams)
    generated = bench_coca.ours_generate(ours, images, 4, num_beams)
    assert generated.shape == (2, 5)  # forced length: start token + 4 new tokens
    assert bench_coca.same_tokens(generated, expected)

    original = ours.lm_head.weight.detach().clone()
    with torch.no_grad():  # a model that always prefers token 7: the check must notice
        ours.lm_head.weight[7] = 100.0 * original.abs().max()
    try:
        assert not bench_coca.same_tokens(bench_coca.ours_generate(ours, images, 4, num_beams), expected)
    finally:
        with torch.no_grad():
            ours.lm_head.weight.copy_(original)


def test_blip2_weight_mapping_fills_every_tensor_and_refuses_a_k_bias():
    ours, reference, config = bench_blip2.build_pair(argparse.Namespace(layers=1, quick=True))
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt = bench_blip2.prompts(1, vqa=True, quick=True, seed=0)
    labels = bench_blip2.prompts(1, vqa=True, quick=True, seed=1)
    ours_loss, reference_loss = bench_blip2.loss_functions(ours.eval(), reference.eval(), config, images, prompt, labels)
    with torch.no_grad():
        assert ours_loss().item() == pytest.approx(reference_loss().item(), abs=1e-5)

    state = reference.state_dict()
    state["vision_model.encoder.layers.0.self_attn.qkv.bias"][70] = 1.0  # inside the k part (width 64)
    with pytest.raises(ValueError, match="layers.0.self_attn.qkv.bias.*k part"):
        bench_blip2.transformers_blip2_to_ours(state)


def test_loader_benchmark_measures_every_config_on_both_sides_with_the_same_pixels(tmp_path):
    assert bench_loader.main(["--quick", "--out", str(tmp_path)]) == 0
    records = {r["case"]: r for r in harness.load_records(tmp_path)}
    assert set(records) == {f"{recipe}_{mode}_w{workers}" for recipe in bench_loader.RECIPES
                            for mode in bench_loader.MODES for workers in (0, 1, 2)}
    for case, record in records.items():
        assert record["benchmark"] == "loader"
        for metric in ("samples/s", "samples/s per core"):
            values = record["metrics"][metric]
            assert values["ours"] > 0 and values["upstream"] > 0, (case, metric)
            assert values["ratio"] == pytest.approx(values["ours"] / values["upstream"])
        assert record["params"]["timed_samples"] == 2 * 4  # --quick: 2 timed batches of 4, after a warm-up batch
        # both transforms gave the same tensor for the same image and seed: the two sides do the same work
        assert record["checks"]["same_pixels"] is True
        # the recipe's collator made the batches
        text = ["labels"] if record["params"]["recipe"] == "blip2-stage2" else ["return_loss"]
        assert record["params"]["batch_keys"] == sorted(["pixel_values", "input_ids", "attention_mask", *text])
        assert record["params"]["loader"] == {"ours": "StatefulDataLoader", "upstream": "DataLoader"}


def _loader_record(workers: int, per_core: float, mode: str = "streaming", side: int = 256) -> harness.Record:
    rates = {"ours": per_core, "upstream": per_core, "ratio": 1.0}
    return harness.Record(benchmark="loader", case=f"coca_{mode}_w{workers}_src{side}",
                          params={"recipe": "coca", "mode": mode, "workers": workers, "source_short_side": side,
                                  "seed_run": bench_loader.SEED_RUN},
                          metrics={"samples/s": rates, "samples/s per core": rates}, seconds={})


def test_workers_per_gpu_divides_the_rate_the_flops_imply_by_the_rate_per_core(tmp_path):
    from hf_vlm.trainers.recipes import get_recipe

    harness.save(harness.Record(benchmark="flops", case="coca-large-v2", params={}, seconds={},
                                metrics={"GFLOP/sample train step": {"ours": 990.0},
                                         "samples/s at 100% MFU, A100": {"ours": 315.0}}), tmp_path)
    assert bench_loader.workers_per_gpu(harness.load_records(tmp_path)) == []  # no loader records: no answer
    harness.save(_loader_record(workers=1, per_core=500.0), tmp_path)  # fewer workers than w2: not the one used
    harness.save(_loader_record(workers=2, per_core=50.0), tmp_path)
    harness.save(_loader_record(workers=2, per_core=1000.0, mode="map"), tmp_path)  # map-style: not what trains
    harness.save(_loader_record(workers=2, per_core=20.0, side=512), tmp_path)
    rows = bench_loader.workers_per_gpu(harness.load_records(tmp_path))

    recipe = get_recipe("coca-large-v2")
    assert [(row["source_short_side"], row["per_core"]) for row in rows] == [(256, 50.0), (512, 20.0)]
    assert rows[0]["samples_per_s_needed"] == pytest.approx(315.0 * 0.4)  # 126 samples/s at 40% MFU
    assert [row["workers"] for row in rows] == [3, 7]  # ceil(126 / 50) = ceil(2.52); ceil(126 / 20) = ceil(6.3)
    assert rows[0]["gpus"] == recipe.nodes * recipe.gpus_per_node
    # the floor: 4e9 pairs once in 4 weeks on the recipe's GPUs
    assert rows[0]["floor_samples_per_s"] == pytest.approx(4e9 / (rows[0]["gpus"] * 28 * 86400))
    assert rows[0]["recipe_workers"] == recipe.training["dataloader_num_workers"]

    assert report.main([str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "## Loader workers per GPU: coca-large-v2 on A100" in readme
    assert "ceil(126.0 / 50.0) = ceil(2.520) = **3**" in readme and "ceil(126.0 / 20.0) = ceil(6.300) = **7**" in readme


def test_bulk_caption_benchmark_times_hf_vlm_caption_against_the_pipeline_on_the_same_captions(tmp_path):
    from benchmarks import bench_bulk

    assert bench_bulk.main(["--quick", "--decodings", "greedy", "--out", str(tmp_path)]) == 0
    records = {r["case"]: r for r in harness.load_records(tmp_path)}
    assert set(records) == {f"{model}_tiny_b4_greedy_vs_pipeline_{way}" for model in ("coca", "blip2")
                            for way in ("loop", "lists4")}
    for case, record in records.items():
        assert record["benchmark"] == "bulk_caption" and record["params"]["images"] == 6
        assert record["params"]["decoding"]["num_beams"] == 1
        values = record["metrics"]["images/s"]
        assert values["ours"] > 0 and values["upstream"] > 0, case
        assert values["ratio"] == pytest.approx(values["ours"] / values["upstream"])
        assert record["checks"]["same_captions"] is True, case  # both sides gave every image the same caption


@pytest.mark.slow  # dynamo traces a decoding step (~15-30 s on 2 shared cores)
def test_compile_benchmark_times_compiled_against_eager_captioning_with_the_same_tokens(tmp_path):
    from benchmarks import bench_coca_compile

    argv = ["--quick", "--backend", "eager", "--beams", "1", "--repeats", "1", "--budget-s", "0", "--out", str(tmp_path)]
    assert bench_coca_compile.main(argv) == 0
    records = {r["case"]: r for r in harness.load_records(tmp_path)}
    assert set(records) == {"greedy_b2_t4"}
    record = records["greedy_b2_t4"]
    assert record["benchmark"] == "coca_compile" and record["params"]["backend"] == "eager"
    values = record["metrics"]["images/s"]
    assert values["ours"] > 0 and values["upstream"] > 0
    assert values["ratio"] == pytest.approx(values["ours"] / values["upstream"])
    # compiled and eager gave the same captions; every decoding step ran the one graph, without a break
    assert record["checks"]["same_tokens"] is True
    assert record["checks"]["graphs"] == 1 and record["checks"]["graph_breaks"] == 0
