"""Distillation-aware errors: the planner's error table with learned candidates measured after stage 1.

Attention Surgery's knapsack weighs e_ir, block i's error at rate r measured after stage-1
distillation. A learned variant (`training_free = False`: feature maps) measured at its init is ranked
by an error that distillation removes, which biases the plan against it. `DistilledErrors` first trains
every learned candidate of every layer with a recipe's stage-1 settings and `distill`'s value-based L1
loss, all candidates of a layer on the same teacher forward (`transfer.attention_transfer_fn`); then it
measures every candidate, trained or as built, on the calibration inputs. The training never sees those:
its inputs come from the next seed (noise, toy clips) or from a dataset's rows after the calibration rows.
The trained weights go with the table, so that the plan hands the chosen ones to `distill`.

Each candidate's gradient is clipped on its own (to the stage's grad_clip), so a candidate trains the same
whichever others train beside it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import torch

from ..data import StepSampler, build_dataset
from ..errors import SurgeryError
from ..model import conditioner, is_toy
from ..recipe import DataSection, Stage1
from ..sensitivity import Candidate, ErrorTable, build_candidates, measure_errors
from ..variants import VARIANTS
from ..wan import self_attention_fqn
from .loop import run_stage
from .transfer import attention_transfer_fn, loss_ends


@dataclasses.dataclass(frozen=True)
class DistilledErrors:
    """`make_plan(measure=DistilledErrors(stage1))`: errors of learned candidates after `stage1`'s training,
    on `samples` training inputs (noise or toy clips; with a dataset, its rows after the calibration rows), at
    the noise levels distillation trains on (`timestep_shift`, `surgery.data.StepSampler`)."""

    stage1: Stage1
    samples: int = 32
    timestep_shift: float = 1.0

    @classmethod
    def for_recipe(cls, recipe) -> "DistilledErrors":
        """Stage 1 as `recipe` trains it."""
        return cls(recipe.stage1, recipe.data.samples, recipe.data.timestep_shift)

    def __call__(self, model, candidates: list[Candidate], inputs: list[dict], *, grid, seed: int,
                 data: str | None, text_tokens: int, progress=None, band=(0.0, 1.0), image_tokens=None) -> ErrorTable:
        layers = range(len(model.blocks))
        modules = {i: build_candidates(model, i, candidates, seed) for i in layers}
        learned = [j for j, c in enumerate(candidates) if not VARIANTS[c.variant].training_free]
        trained = {i: [j for j in learned if any(True for _ in modules[i][j].parameters())] for i in layers}
        trained = {i: js for i, js in trained.items() if js}
        steps = self.stage1.steps if trained else 0
        total = steps + len(inputs)
        losses = {(i, j): [] for i, js in trained.items() for j in js}
        built = None
        if steps:
            built = self._errors_as_built(model, inputs, candidates, modules, trained, seed)
            dataset = self._training_data(model, grid, seed, data, text_tokens, held_out=len(inputs),
                                          image_tokens=image_tokens)
            self._train(model, modules, trained, candidates, dataset, seed, losses, band,
                        progress=(lambda done: progress(done, total)) if progress else None)
        table = measure_errors(model, inputs, candidates, seed=seed, modules=modules,
                               progress=(lambda done, _: progress(steps + done, total)) if progress else None)
        if losses:
            table.method = (f"learned candidates after stage 1 ({steps} steps, lr {self.stage1.lr:g}, on inputs "
                            "held out from calibration), the others as built")
        table.trained = {(i, j): {name: p.detach().cpu().clone() for name, p in modules[i][j].named_parameters()}
                         for (i, j) in losses}
        table.losses = {pair: loss_ends(values) for pair, values in losses.items()}
        if built is not None:
            table.built_errors = [[built.get((i, j), table.errors[i][j]) for j in range(len(candidates))]
                                  for i in layers]
        table.modules = modules
        return table

    @staticmethod
    def _errors_as_built(model, inputs, candidates, modules, trained, seed) -> dict[tuple[int, int], float]:
        """(layer, candidate) → error before training, for the candidates that train (the others' errors do
        not change): the planner can then also solve with init errors and check both plans whole."""
        learned = sorted({j for js in trained.values() for j in js})
        table = measure_errors(model, inputs, [candidates[j] for j in learned], seed=seed,
                               modules={i: [modules[i][j] for j in learned] for i in modules})
        return {(i, j): table.errors[i][col] for i, js in trained.items() for col, j in enumerate(learned) if j in js}

    def _training_data(self, model, grid, seed: int, data: str | None, text_tokens: int, held_out: int,
                       image_tokens: int | None = None):
        config = dict(model.config)
        if data is not None:
            dataset = build_dataset(DataSection(source="dataset", path=data), config, grid, text_tokens, seed)
            if len(dataset) <= held_out:
                raise SurgeryError(f"dataset {data} has {len(dataset)} rows: the planner calibrates on the first "
                                   f"{held_out} and needs more to train the learned candidates on")
            return dataset.select(range(held_out, len(dataset)))
        # `calibration_inputs` draws from `seed`: the next seed gives other latents, clips and captions.
        source = DataSection(source="toy" if is_toy(config) else "noise", samples=self.samples)
        return build_dataset(source, config, grid, text_tokens, seed + 1, image_tokens)

    def _train(self, model, modules, trained, candidates, dataset, seed, losses, band, progress) -> None:
        param = next(model.parameters())
        sampler = StepSampler(dataset, 1, seed, stage=1, condition=conditioner(dict(model.config)), band=band,
                              timestep_shift=self.timestep_shift)
        trainees = {i: [modules[i][j] for j in js] for i, js in trained.items()}
        transfer = attention_transfer_fn(model, trainees, sampler, param.device, param.dtype)

        def step(index: int) -> dict:
            layer_losses, _, samples = transfer(index)
            for i, js in trained.items():
                for j, loss in zip(js, layer_losses[i]):
                    losses[i, j].append(loss)
                    torch.nn.utils.clip_grad_norm_(modules[i][j].parameters(), self.stage1.grad_clip)
            if progress:
                progress(index + 1)
            step_losses = [values[-1] for values in losses.values()]
            return {"loss": sum(step_losses) / len(step_losses), "samples": samples}

        params, lr_scales = {}, {}
        for i, js in trained.items():
            for j in js:
                for name, p in modules[i][j].named_parameters():
                    key = f"{self_attention_fqn(i)}.candidates.{j}.{name}"
                    params[key], lr_scales[key] = p, self.stage1.lr_scale(candidates[j].variant)
        # Clipped per candidate in `step`; the loop's clip over all of them together is switched off.
        schedule = dataclasses.replace(self.stage1, grad_clip=math.inf)
        with tempfile.TemporaryDirectory(prefix="vsurgery-plan-") as work:
            run_stage("planner stage 1", params, step, schedule, Path(work) / "checkpoints",
                      Path(work) / "metrics.jsonl", checkpoint_every=schedule.steps, lr_scales=lr_scales)


def recipe_plan_options(recipe, progress=None) -> dict:
    """`surgery.planner.make_plans` options from a recipe: its [plan] section, and its stage 1 to measure learned
    candidates after (`plan.distill_errors`)."""
    p = recipe.plan
    return dict(variants=p.variants, keep_full=p.keep_full, params_by_variant=p.params_by_variant, samples=p.samples,
                seed=recipe.train.seed, data=recipe.data.path if recipe.data.source == "dataset" else None,
                dense_steps=p.dense_steps, sampling_steps=p.sampling_steps, progress=progress,
                measure=DistilledErrors.for_recipe(recipe) if p.distill_errors else None)
