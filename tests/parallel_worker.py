"""One process of the 2-process launch that tests/test_parallel.py starts (torchrun -m tests.parallel_worker, gloo on CPU).

Every process runs the same calls, in order: distill with DDP, with FSDP, with FSDP and no stage 2, with DDP
planning first, with FSDP
(weights kept gathered until the backward) stopped after a stage-2 checkpoint, and the resume of a run that one
process started; then with context parallelism a forward, a generation, a bench and an eval. The test
compares what they write with single-process runs. argv[1]: the folder holding job.json.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgery.plan import Plan
from surgery.recipe import load_recipe
from surgery.train import distill
from surgery.train.loop import StopRequested


def main(folder: Path) -> None:
    job = json.loads((folder / "job.json").read_text())
    plan = Plan.load(folder / "plan.json")
    for strategy in ("ddp", "fsdp"):
        recipe = load_recipe("hybrid", job["recipe"] + [f"parallel.strategy={strategy}"])
        distill("tiny", recipe, folder / strategy, plan=plan)
    # Stage 1 alone: the student is the sharded teacher's weights with the trained attention.
    distill("tiny", load_recipe("hybrid", job["recipe"] + ["parallel.strategy=fsdp", "stage2.steps=0"]),
            folder / "fsdp-stage1", plan=plan)
    distill("tiny", load_recipe("hybrid", job["recipe"] + job["planned"]), folder / "planned")  # planned here
    try:
        recipe = load_recipe("hybrid", job["recipe"] + ["parallel.strategy=fsdp", "parallel.sharding=grad_op"])
        distill("tiny", recipe, folder / "fsdp-stopped", plan=plan, stop_after=job["stop_after"])
    except StopRequested:
        pass
    distill("tiny", load_recipe("hybrid"), folder / "one-stopped", resume=True)

    from surgery.benchmark import benchmark
    from surgery.evaluate import evaluate, generate_video
    from tests.test_parallel import CP_EVAL, CP_VIDEO, cp_model_and_inputs, training_free_plan

    # diffusers derives a device index from the accelerator count, which is 0 on a machine without one.
    torch.accelerator.device_count = lambda: 1
    from surgery.parallel import context_parallel, is_main_process

    model, inputs = cp_model_and_inputs()
    context_parallel(model, 2)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    video = generate_video("tiny", "a cat", cp=2, **CP_VIDEO)
    report = benchmark("tiny", plan=Plan.load(folder / "cp-plan.json"), repeats=1, guidance=False, cp=2)
    evaluation = evaluate(None, "tiny", plan=training_free_plan(), cp=2, **CP_EVAL)
    if is_main_process():
        save_file({"out": out.contiguous(), "video": torch.from_numpy(video).contiguous()}, folder / "cp.safetensors")
        (folder / "cp-bench.json").write_text(json.dumps(report.to_dict()))
        (folder / "cp-eval.json").write_text(json.dumps(evaluation.to_dict()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
