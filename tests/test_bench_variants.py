"""scripts/bench_variants.py without a GPU: stages add their fields to one record per variant,
the ratios the issue's targets read are derived from them, and bad arguments are refused."""

from __future__ import annotations

import json

import pytest

from scripts.bench_variants import derived, expert_fraction, main, max_ctx, merge_record


def test_stages_merge_into_one_record_per_variant(tmp_path):
    path = tmp_path / "variants.json"
    merge_record(path, "e2b", {"ctx": 131072, "export_s": 300.0, "plan_gib": 5.0})
    merge_record(path, "e4b", {"ctx": 131072, "export_s": 330.0})
    recs = merge_record(path, "e2b", {"runtime_peak_gib": 4.9, "decode_tok_s": 300.0, "floor_tok_s": 600.0})
    assert json.loads(path.read_text()) == recs
    assert set(recs) == {"e2b", "e4b"} and recs["e4b"]["export_s"] == 330.0
    e2b = recs["e2b"]
    assert e2b["export_s"] == 300.0 and e2b["variant"] == "e2b"
    assert e2b["peak_over_plan"] == pytest.approx(0.98) and e2b["fraction_of_floor"] == pytest.approx(0.5)
    assert [f.name for f in tmp_path.iterdir()] == ["variants.json"]  # written whole, renamed; no lock file


def test_ratios_need_both_figures():
    assert "peak_over_plan" not in derived({"runtime_peak_gib": 1.0})
    assert "fraction_of_floor" not in derived({"plan_gib": 1.0})


def test_only_moe_variants_read_a_share_of_their_experts():
    assert expert_fraction("26b-a4b") == 8 / 128
    assert expert_fraction("e4b") == 1.0 and expert_fraction("31b") == 1.0
    assert max_ctx("26b-a4b") == 262144 and max_ctx("e2b") == 131072


@pytest.mark.parametrize("argv, message", [
    (["--variant", "e3b"], "--variant e3b: not a preset"),
    (["--stages", "export,bench"], "--stages export,bench: expected a comma-separated subset"),
])
def test_bad_arguments_name_the_flag(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main([*argv, "--json", str(tmp_path / "v.json")])


def test_runtime_stage_without_an_artifact_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="no artifact; run --stages export first"):
        main(["--variant", "tiny", "--stages", "runtime", "--workdir", str(tmp_path), "--device", "cpu",
              "--json", str(tmp_path / "v.json")])


def test_runtime_stage_runs_the_artifact_and_its_floor_reads_the_chosen_experts(tmp_path, tiny_moe_artifact):
    """The runtime stage on the session's tiny-moe artifact (CPU): prefill and decode figures, and a
    floor whose bytes count only top-k / E of each expert stack."""
    from runtime.runner import Runner
    from scripts.bench_runtime import decode_read_bytes

    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny-moe").symlink_to(tiny_moe_artifact.out_dir)
    path = tmp_path / "v.json"
    main(["--variant", "tiny-moe", "--stages", "runtime", "--device", "cpu", "--ctx", "64", "--prompt", "20",
          "--new-tokens", "4", "--workdir", str(work), "--json", str(path)])
    rec = json.loads(path.read_text())["tiny-moe"]
    assert rec["prompt"] == 20 and rec["prefill_tok_s"] > 0 and rec["decode_tok_s"] > 0 and rec["ctx"] == 64
    assert rec["kv_dtype"] == tiny_moe_artifact.metadata["kv_dtype"]  # the cache the export took
    runner = Runner.load(tiny_moe_artifact.out_dir)
    window = tiny_moe_artifact.metadata["sliding_window"]
    share = expert_fraction("tiny-moe")
    assert 0 < share < 1
    assert rec["bytes_read_per_token"] == decode_read_bytes(runner, 22, window, share)
    assert rec["bytes_read_per_token"] != decode_read_bytes(runner, 22, window)  # the stacks' other experts
    assert rec["floor_tok_s"] == pytest.approx(rec["copy_gbps"] * 1e9 / sum(rec["bytes_read_per_token"].values()))
    assert rec["chain_us_per_kernel"] is None  # the dependent-kernel chain is timed on CUDA only
