"""scripts/bf16_conditioning.py on a tiny narrow model (CPU, seconds): both q / k norm settings run,
the fp32 copy holds the bf16 model's weights, and every layer's last-step error is reported."""

import json

import torch

from scripts import bf16_conditioning as bc


def test_fp32_copy_keeps_the_bf16_weights_and_scaling_only_touches_qk_norms():
    cfg = bc.narrow("31b", 128, 2, 256)
    plain, scaled = bc.build(cfg, 40, 16, False), bc.build(cfg, 40, 16, True)
    for (name, a), (_, b) in zip(plain.named_parameters(), scaled.named_parameters()):
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.allclose(b.float(), a.float() * (3.0 / a.numel()) ** 0.25, rtol=1e-2), name
        else:
            assert torch.equal(a, b), name
    wide = plain.float()
    assert all(p.dtype == torch.float32 for p in wide.parameters())


def test_tiny_run_reports_both_settings(tmp_path):
    out = tmp_path / "c.json"
    assert bc.main(["--hidden", "128", "--layers", "2", "--vocab", "256", "--prompt", "32", "--chunk", "16",
                    "--decode", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["qk_norms"] for r in doc["runs"]] == ["as drawn", "scaled"]
    for r in doc["runs"]:
        assert 0 < r["logits_rel_err_mean"] <= r["logits_rel_err_max"] < 2
        assert set(r["last_step"]) == {f"{k}{i}" for k in ("attn", "layer") for i in range(2)}
