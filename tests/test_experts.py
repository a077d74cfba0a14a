"""Wan2.2 A14B's two experts: two plans in one file, each expert distilled on its own noise band, one pipeline
export that diffusers loads with both experts retrofitted."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.errors import ModelLoadError, PlanError
from surgery.experts import ExpertPlans, load_plan_for, make_expert_plans, steps_served
from surgery.recipe import load_recipe
from surgery.run import run_all

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["plan.distill_errors=false", "plan.samples=2", "stage1.steps=4", "stage2.steps=2"]


@pytest.fixture(scope="module")
def two_expert_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan22") / "run"
    summary = run_all("tiny-wan2.2", load_recipe("hybrid", FAST), out, eval_steps=2)
    return out, summary


def test_a_budget_holds_for_the_sampling_run_or_for_each_expert():
    served = steps_served(0.875)
    assert served["transformer"] + served["transformer_2"] == 40 and 0 < served["transformer"] < 20
    options = dict(variants=["hybrid", "linear"], samples=1)
    run = make_expert_plans("tiny-wan2.2", 0.5, **options)
    assert run.meta["budget_scope"] == "sampling run" and run.meta["flops_ratio"] <= 0.5 + 1e-9
    assert {plan.meta["calibration"]["timesteps"] for plan in run.plans.values()} == \
        {"spread evenly over (875, 1000)", "spread evenly over (0, 875)"}
    each = make_expert_plans("tiny-wan2.2", 0.5, per_expert=True, **options)
    assert all(plan.meta["flops_ratio"] <= 0.5 + 1e-9 for plan in each.plans.values())
    assert run.meta["solver"]["optimality_gap"] >= 0


def test_run_trains_both_experts_and_the_export_loads_through_wan_pipeline(two_expert_run, tmp_path):
    out, summary = two_expert_run
    assert set(summary.distill) == {"transformer", "transformer_2"}
    assert summary.attention_flops_ratio <= 0.6 + 1e-9
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["finished"] and run_info["experts"] == ["transformer", "transformer_2"]
    for name, band in (("transformer", "(875, 1000)"), ("transformer_2", "(0, 875)")):
        plan = json.loads((out / name / "plan.json").read_text())
        assert plan["model"]["id"] == f"tiny-wan2.2@{name}" and band in plan["calibration"]["timesteps"]
    plans = ExpertPlans.load(out / "plan.json")
    expected = {name: sorted(c.variant for c in plan.layers.values()) for name, plan in plans.plans.items()}
    script = textwrap.dedent(f"""
        import json, sys
        import surgery  # diffusers loads components only from libraries already imported
        from diffusers import WanPipeline
        from surgery.swap import variant_processors
        pipe = WanPipeline.from_pretrained({str(out / 'exported')!r})
        kinds = {{}}
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name)
            assert type(model).__name__ == "SurgeryWanTransformer3DModel", type(model)
            kinds[name] = sorted(type(b.attn1.processor).__name__ for b in model.blocks)
        assert pipe.config.boundary_ratio == 0.875
        frames = pipe("a red square", num_frames=5, height=32, width=32, num_inference_steps=2,
                      max_sequence_length=16, output_type="np").frames
        print(json.dumps({{"kinds": kinds, "shape": list(frames.shape)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["shape"] == [1, 5, 32, 32, 3]
    for name in expected:
        assert len(loaded["kinds"][name]) == 4 and any("Full" not in k for k in loaded["kinds"][name]), loaded
        assert sum("Full" in k for k in loaded["kinds"][name]) == expected[name].count("full")


def test_bad_input_about_experts_is_one_line_and_writes_nothing(two_expert_run, tmp_path):
    out, _ = two_expert_run
    exported = str(out / "exported")
    with pytest.raises(ModelLoadError, match="holds two experts"):
        surgery.load_model(exported)  # one transformer of two is not the model
    one = load_plan_for("tiny-wan2.2@transformer", out / "transformer" / "plan.json")
    with pytest.raises(PlanError, match="made for expert transformer"):
        load_plan_for("tiny-wan2.2@transformer_2", out / "transformer" / "plan.json")
    with pytest.raises(PlanError, match="needs one plan per expert"):
        load_plan_for("tiny-wan2.2", out / "transformer" / "plan.json")
    with pytest.raises(PlanError, match="is one transformer"):
        load_plan_for("tiny", out / "plan.json")
    assert one.model == "tiny-wan2.2@transformer"
    cli = CliRunner()
    cases = [
        (["eval", "--student", exported, "--model", "tiny"], "eval needs a student of the teacher"),
        (["distill", "--model", "tiny-wan2.2@transformer_2", "--plan", str(out / "transformer" / "plan.json"),
          "--out", str(tmp_path / "d")], "made for expert transformer"),
        (["export", "--model", "tiny-wan2.2", "--plan", str(out / "transformer" / "plan.json"),
          "--out", str(tmp_path / "e")], "needs one plan per expert"),
    ]
    for args, fragment in cases:
        result = cli.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert fragment in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())


def test_a_community_lora_in_diffusers_wan_format_loads_onto_both_exported_experts(two_expert_run, tmp_path):
    import torch
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    out, _ = two_expert_run
    # A LoRA trained (here: built at random) on the teacher, saved as diffusers saves Wan LoRAs.
    teacher = surgery.load_model("tiny-wan2.2@transformer")
    teacher.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    WanPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(teacher))
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))

    pipe = WanPipeline.from_pretrained(out / "exported")
    pipe.set_progress_bar_config(disable=True)

    def video():
        return torch.from_numpy(pipe("a red square", num_frames=5, height=32, width=32, num_inference_steps=2,
                                     max_sequence_length=16, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).frames)

    before = video()
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="style")
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="style", load_into_transformer_2=True)
    for model in (pipe.transformer, pipe.transformer_2):
        q = model.blocks[0].attn1.to_q  # self-attention keeps diffusers' projections, so the LoRA lands there too
        assert "style" in q.lora_A and surgery.variant_processors(model)
    assert (video() - before).abs().max() > 1e-3


def test_a_training_free_two_expert_plan_exports_and_evaluates_like_the_plan_itself(tmp_path):
    from surgery.evaluate import evaluate
    from surgery.exporting import export_planned

    size = dict(frames=9, height=96, width=96)  # 108 tokens: small, and sparse attention still saves there
    plans = make_expert_plans("tiny-wan2.2", 0.7, variants=["vsa", "vmoba"], samples=1, **size)
    plans.save(tmp_path / "plan.json")
    exported = export_planned("tiny-wan2.2", tmp_path / "plan.json", tmp_path / "exported")
    with pytest.raises(ModelLoadError, match="holds two experts"):
        surgery.load_exported(exported)
    options = dict(samples=1, steps=2, **size)
    from_plan = evaluate(None, "tiny-wan2.2", plan=tmp_path / "plan.json", **options)
    from_export = evaluate(str(exported), "tiny-wan2.2", **options)
    assert from_export.velocity_error_mean == pytest.approx(from_plan.velocity_error_mean, rel=1e-4)
    assert from_plan.velocity_error_mean > 0
