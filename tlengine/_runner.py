"""The trial runner: the Optuna objective of a search, one trial per call.

A call claims a slot in the study, samples the trial's values, builds its model
(:func:`tlengine._model.build_trial_model`, as export and report do), asks the search's
:class:`~tlengine._inputs.InputSource` for its inputs, resumes it from the checkpoint of
the trial it retries, fits it, and finishes it (checkpoint, attributes, cost). It needs
a :class:`~tlengine._setup.SearchSetup`, a study and an input source, no command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError
from tlengine._timing import stage

if TYPE_CHECKING:
    import optuna
    import rich.console
    import rich.progress
    import torch

    from tlengine._distill import DistillLoss
    from tlengine._inputs import InputRequest, InputSource, TrialInputs
    from tlengine._setup import SearchSetup
    from tlengine._train import EpochResult, TrainingState


class Surplus(Exception):
    """A worker asked for a trial after the others had already taken the study's last ones."""


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (timm's random resized crop draws from the latter)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwritable(path: Path, exc: OSError) -> UserError:
    """The one-line error for a checkpoint that could not be written (the trial is marked for resumption)."""
    return UserError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); finished trials are kept, "
                     "free some space and run the same command again to resume")


class TrialRunner:
    """The objective ``study.optimize`` calls: runs one trial and returns its score (and cost).

    Args:
        setup: The search's setup.
        study: The study the trials belong to.
        source: Where trials get their inputs: one source, or one per backbone (by ``NAME:ARCH``) in a search
            over several.
        console: Where messages go.
        progress: Progress bars to add each trial's bar to (none shown if ``None``).
        overall: The progress task advanced once per trial, if any.
        should_stop: Turns true when the user asked to stop (the trial then checkpoints and stops).
        deadline: ``time.monotonic()`` at which ``--timeout`` ends the search: a trial still running
            then stops at its next epoch end, pruned with its last score.

    Attributes:
        running: The number of the trial this runner runs or ran last (``None`` before the first).
    """

    def __init__(self, setup: SearchSetup, study: optuna.Study, source: InputSource | Mapping[str, InputSource], *, console: rich.console.Console,
                 progress: rich.progress.Progress | None = None, overall: Any = None,
                 should_stop: Callable[[], bool] = lambda: False, deadline: float | None = None) -> None:
        from rich.progress import Progress

        self.deadline = deadline
        self.sources = dict(source) if isinstance(source, Mapping) else {setup.record.backbone_spec: source}
        self.setup, self.study, self.source, self.console = setup, study, self.sources[setup.record.backbone_spec], console
        self.progress = progress if progress is not None else Progress(disable=True)
        self.overall, self.should_stop = overall, should_stop
        self._base_states: dict[str, dict[str, torch.Tensor]] = {}
        self.running: int | None = None
        self._probe_heads: dict[tuple[str, int, float], Any] = {}
        self.distiller = None
        if setup.teacher is not None:  # the teacher's outputs, computed once per view, kept beside the features
            from tlengine._distill import Distiller

            caches = self.source.caches
            self.distiller = Distiller(setup.teacher, setup.registry, setup.device, caches.store if caches is not None else None,
                                       setup.config.cache_views, log=lambda line: console.print(f"{setup.label}{line}"))

    def base_state(self, values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The pretrained weights of the trial's backbone, copied once per backbone (trials never change them)."""
        spec = values.get("backbone", self.setup.record.backbone_spec)
        if spec not in self._base_states:
            self._base_states[spec] = {k: v.clone() for k, v in self.setup.candidate(spec).base.state_dict().items()}
        return self._base_states[spec]

    def input_source(self, values: Mapping[str, Any]) -> InputSource:
        """Where the trial's inputs come from: its backbone's source."""
        return self.sources[values.get("backbone", self.setup.record.backbone_spec)]

    def describe(self, values: Mapping[str, Any]) -> str:
        """``depth 2/5, lr 1.0e-03``, after the architecture in a search over several backbones."""
        arch = f"{values['backbone'].rpartition(':')[2]}, " if "backbone" in values else ""
        return f"{arch}depth {values['freeze_depth']}/{self.stages(values)}, lr {values['lr']:.1e}"

    def stages(self, values: Mapping[str, Any]) -> int:
        """The trial's backbone's stage count (its deepest freeze depth)."""
        return self.setup.record.for_values(values).stages

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        from tlengine._resume import worker_identity

        self.running = trial.number
        trial.set_user_attr("worker", worker_identity())
        self.claim(trial)
        values = self.sample(trial)
        model, optimizer = self.build(trial, values)
        if self.lp_ft(values, model):
            self.start_from_probe(trial, values, model)
        if self.exact_probe(values, model):
            with stage("training"):
                history = self.probe(trial, values, model)
            return self.finish(trial, values, model, history, None)
        request = self.request(trial, values)
        inputs = self.input_source(values).inputs(model, model.backbone, request)
        for note in inputs.notes:
            self.say(trial, note)
        if inputs.early:
            trial.set_user_attr("early", dict(inputs.early))
        resume, previous = self.resume(trial, model)
        with stage("training"):
            history = self.fit(trial, values, model, optimizer, inputs, resume, self.distill_loss(values, request, inputs))
        return self.finish(trial, values, model, history, previous)

    def say(self, trial: optuna.Trial, line: str) -> None:
        """Print ``line`` about ``trial`` (prefixed with the worker in a worker process)."""
        self.console.print(f"{self.setup.label}trial {trial.number}: {line}")

    def claim(self, trial: optuna.Trial) -> None:
        """Take a slot of the study's ``--trials``, counting the trials finished or running ahead of this
        one and the retries of stopped trials still waiting (they resume work already done, so they go first).

        Raises:
            Surplus: The study has its trials already; enqueued work (a recipe, a retry) goes back in the queue.
        """
        from optuna.trial import TrialState

        done = (TrialState.COMPLETE, TrialState.PRUNED)
        system_attrs = self.study._storage.get_trial(trial._trial_id).system_attrs
        others = self.study.get_trials(deepcopy=False, states=(*done, TrialState.RUNNING, TrialState.WAITING))
        ahead = [t for t in others if t.state in done or t.state == TrialState.RUNNING and t.number < trial.number]
        retries = [] if "failed_trial" in system_attrs else [
            t for t in others if t.state == TrialState.WAITING and "failed_trial" in t.system_attrs]
        n_trials = self.setup.n_trials
        if len(ahead) + len(retries) < n_trials:
            return
        if not retries:  # the other workers finish the study
            self.study.stop()
        trial.set_user_attr("surplus", True)
        if "fixed_params" in system_attrs:
            self.study.enqueue_trial(trial.params, user_attrs={k: v for k, v in trial.user_attrs.items() if k not in ("surplus", "worker")})
        raise Surplus(f"the study already has its {n_trials} trials")

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Every value the trial uses: sampled, fixed, or set by its recipe; stored as its ``values`` attribute.

        The policy goes first (it rules out the dimensions it does not use), and the backbone (in a search over
        several, each backbone's freeze depth is its own parameter, sampled once the backbone is).
        """
        from tlengine._space import active, depth_dimension

        space, registry = self.setup.space, self.setup.registry
        overrides = trial.user_attrs.get("overrides", {})
        values: dict[str, Any] = {}
        for name in sorted((n for n in space if "." not in n), key=lambda n: n not in ("augment", "backbone")):
            dim = space[name]
            if name == "freeze_depth" and "backbone" in space:
                dim = depth_dimension(dim, values["backbone"], self.stages(values))
            values[name] = overrides.get(name, dim.value) if not dim.searched else dim.suggest(trial) if active(values, name) else None
        values = {name: values[name] for name in space if "." not in name}
        for plugin in (registry.heads[values["head"]], registry.optimizers[values["optimizer"]]):
            values.update({f"{plugin.name}.{p}": space[f"{plugin.name}.{p}"].suggest(trial) for p in plugin.params})
        trial.set_user_attr("values", values)
        return values

    def build(self, trial: optuna.Trial, values: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The trial's model (from the base weights, frozen at its depth) and its optimizer, seeded by the trial."""
        from tlengine._model import build_trial_model
        from tlengine._train import param_groups

        setup = self.setup
        seed_everything(setup.config.seed + trial.number)
        model = build_trial_model(setup.registry, setup.record, values, backbone_state=self.base_state(values))
        opt = setup.registry.optimizers[values["optimizer"]]
        groups = param_groups(model, values["weight_decay"], values["layer_decay"])
        return model, opt.factory(groups, values["lr"], values["weight_decay"], **{p: values[f"{opt.name}.{p}"] for p in opt.params})

    def exact_probe(self, values: dict[str, Any], model: torch.nn.Module) -> bool:
        """Whether the trial is a linear probe solved exactly (``probe = "exact"``): every stage frozen,
        one linear layer on the pooled features, no mixup or cutmix, no head-only epochs to replay."""
        import torch

        return (values.get("probe", "exact") == "exact" and values["freeze_depth"] >= self.stages(values)
                and type(model.head) is torch.nn.Linear and not (values["mixup"] > 0 or values["cutmix"] > 0))

    def lp_ft(self, values: dict[str, Any], model: torch.nn.Module) -> bool:
        """Whether a trial that trains some stages starts its linear head from the exact probe's solution
        (``head_init = "probe"``: LP-FT, Kumar et al., 2022)."""
        import torch

        return (values.get("head_init") == "probe" and values["freeze_depth"] < self.stages(values)
                and type(model.head) is torch.nn.Linear)

    def start_from_probe(self, trial: optuna.Trial, values: dict[str, Any], model: torch.nn.Module) -> None:
        """Copy the exact probe's head into ``model`` (solved once per image size and label smoothing in this process)."""
        import torch

        key = (values.get("backbone", ""), values["image_size"], values["label_smoothing"])
        if key not in self._probe_heads:
            self._probe_heads[key] = self.solve_head(values, model, self.setup.config.seed, count=False)[0]
        fit = self._probe_heads[key]
        with torch.no_grad():
            model.head.weight.copy_(fit.weight)
            model.head.bias.copy_(fit.bias)
        trial.set_user_attr("head_init", {"l2": fit.l2, "inner_score": fit.inner_score})

    def solve_head(self, values: dict[str, Any], model: torch.nn.Module, seed: int, *, count: bool = True) -> tuple[Any, Any]:
        """The exact linear probe on the frozen pooled features (:mod:`tlengine._probe`) for ``model``'s head,
        and those features: ``(ProbeFit, ProbeFeatures)``."""
        import torch

        from tlengine._probe import fit_linear_probe

        record = self.setup.record
        probe = self.input_source(values).probe_features(model.backbone, values["image_size"], count=count)
        targets = probe.train_targets if self.distiller is None else self.true_targets()
        if record.task == "regression":  # the head outputs standardised targets
            targets = (targets - model.target_mean) / model.target_std
        weights = None if self.setup.class_weights is None else torch.as_tensor(self.setup.class_weights, dtype=torch.float32)
        fit = fit_linear_probe(probe.train, targets, task=record.task, metric=record.metric, outputs=record.num_outputs,
                               class_weights=weights, label_smoothing=values["label_smoothing"] if record.task == "classification" else 0.0,
                               seed=seed)
        return fit, probe

    def probe(self, trial: optuna.Trial, values: dict[str, Any], model: torch.nn.Module) -> list[EpochResult]:
        """Solve the trial's linear head on the frozen pooled features and score it on the validation
        features; one result, reported to the pruner at the last epoch's step."""
        import torch

        from tlengine._metrics import score
        from tlengine._probe import Rows, probe_outputs
        from tlengine._train import EpochResult

        record, started = self.setup.record, time.perf_counter()
        fit, probe = self.solve_head(values, model, self.setup.config.seed + trial.number)
        with torch.no_grad():
            model.head.weight.copy_(fit.weight)
            model.head.bias.copy_(fit.bias)
        val = probe_outputs(Rows(probe.val), fit.weight, fit.bias, record.task)  # a chunk of features at a time
        val = val * model.target_std + model.target_mean if record.task == "regression" else val
        value = score(record.metric, val, probe.val_targets)
        trial.set_user_attr("probe", {"l2": fit.l2, "inner_score": fit.inner_score, "solve_seconds": round(fit.seconds, 3),
                                      "features": probe.source})
        self.say(trial, f"exact linear probe: L2 {fit.l2:g} chosen on an inner split ({record.metric} {fit.inner_score:.4f} there), "
                        f"solved in {fit.seconds:.1f} s on {probe.source} features")
        if self.overall is not None:
            self.progress.advance(self.overall)
        if not record.objectives:  # at the last epoch's step, beside the other trials' final scores; done, so never pruned
            trial.report(value, record.epochs - 1)
        return [EpochResult(record.epochs - 1, fit.train_loss, value, time.perf_counter() - started)]

    def request(self, trial: optuna.Trial, values: dict[str, Any]) -> InputRequest:
        """What the trial asks of the input source."""
        from tlengine._inputs import InputRequest
        from tlengine._loaders import Augment

        return InputRequest(
            depth=values["freeze_depth"], image_size=values["image_size"], augment=Augment.of(values),
            mixup=values["mixup"] > 0 or values["cutmix"] > 0, batch_size=values["batch_size"], epochs=self.setup.record.epochs,
            shuffle_seed=self.setup.config.seed + trial.number,
        )

    def true_targets(self, *, standardised: bool = False) -> torch.Tensor:
        """The training images' targets (a distillation trial's loaders give their indices instead): class indices,
        or regression targets in their own units (``standardised``: as the head outputs them)."""
        from tlengine._loaders import target_tensor

        record = self.setup.record
        targets = target_tensor(self.setup.data.train.targets, record.task)
        return (targets - record.target_mean) / record.target_std if standardised and record.task == "regression" else targets

    def distill_loss(self, values: dict[str, Any], request: InputRequest, inputs: TrialInputs) -> DistillLoss | None:
        """A distillation trial's loss (:class:`tlengine._distill.DistillLoss`), or ``None`` in a search."""
        if self.distiller is None:
            return None
        return self.distiller.loss(values, self.input_source(values), request, on_features=inputs.on_features,
                                   true_targets=self.true_targets(standardised=True), task=self.setup.record.task,
                                   label_smoothing=values["label_smoothing"], class_weights=self.setup.class_weights)

    def resume(self, trial: optuna.Trial, model: torch.nn.Module) -> tuple[TrainingState | None, Path | None]:
        """The training state to continue from when ``trial`` retries a stopped one (its epochs replayed to the
        pruner), and the stopped trial's checkpoint; ``(None, None)`` for a new trial."""
        from tlengine._resume import load_checkpoint, retried_from
        from tlengine._study import first_line

        origin = retried_from(trial)
        previous = Path(trial.user_attrs.get("epoch_checkpoint", "")) if origin is not None else None
        resume = None
        if previous is not None and previous.is_file():
            try:
                resume = load_checkpoint(previous, model)
            except Exception as exc:  # a damaged checkpoint costs the epochs it held, not the trial
                self.say(trial, f"cannot read {previous} ({first_line(exc)}); starting it afresh")
            else:
                trial.set_user_attr("resumed_from", {"trial": origin, "epoch": resume.epoch, "step": resume.step})
                self.console.print(f"{self.setup.label}trial {trial.number} resumes trial {origin} at epoch {resume.epoch + 1}"
                                   + (f", batch {resume.step + 1}" if resume.step else ""))
        if resume is not None and not self.setup.record.objectives:  # the pruner sees the epochs trained before the stop
            for result in resume.history:
                trial.report(result.score, result.epoch)
        return resume, previous

    def fit(self, trial: optuna.Trial, values: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            inputs: TrialInputs, resume: TrainingState | None, distill: DistillLoss | None = None) -> list[EpochResult]:
        """Train the trial with a progress bar, an epoch checkpoint and the pruner (and, in a distillation study,
        ``distill``'s loss).

        Raises:
            optuna.TrialPruned: The pruner stopped it, its loss diverged, or it ran out of memory at the smallest micro-batch.
            TrialInterrupted: The user asked to stop; its checkpoint is saved and it is marked for resumption.
            UserError: Its checkpoint could not be written.
        """
        import optuna

        from tlengine._resume import save_checkpoint
        from tlengine._stages import freeze_stages
        from tlengine._train import OutOfMemory, TrainPlan, TrialInterrupted
        from tlengine._train import fit as fit_model

        setup, record = self.setup, self.setup.record.for_values(values)
        depth, head_epochs = values["freeze_depth"], values["head_epochs"]
        plan = TrainPlan(
            epochs=record.epochs, task=record.task, metric=record.metric, label_smoothing=values["label_smoothing"],
            warmup=values["warmup"], mixup=values["mixup"], cutmix=values["cutmix"], num_classes=record.num_outputs,
            class_weights=setup.class_weights, distill=distill,
        )
        described = self.describe(values)
        checkpoint = setup.run_dir / "trials" / f"{trial.number}.last.safetensors"
        trial.set_user_attr("epoch_checkpoint", str(checkpoint.resolve()))
        label = f"trial {trial.number} · {self.describe(values).replace(', ', ' · ')}" + (" · cached" if inputs.on_features else "")
        steps = max(1, len(inputs.train_loader))
        bar = self.progress.add_task(label, total=record.epochs * steps, completed=(resume.epoch * steps + resume.step) if resume else 0)

        def save(state: TrainingState) -> None:
            try:
                save_checkpoint(checkpoint, model, state)
            except OSError as exc:  # the previous epoch's checkpoint stays for the resume
                trial.set_user_attr("resumable", "its checkpoint could not be written")
                raise unwritable(checkpoint, exc) from exc

        def on_epoch(result: EpochResult) -> None:
            self.progress.update(bar, description=f"{label} · {record.metric} {result.score:.4f}")
            if not record.objectives:  # Optuna prunes single-objective studies only
                trial.report(result.score, result.epoch)
                # after the last epoch the work is done: a finished trial completes, whatever the median
                if result.epoch + 1 < record.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {result.epoch + 1}")
            if self.deadline is not None and time.monotonic() >= self.deadline and result.epoch + 1 < record.epochs:
                raise optuna.TrialPruned(f"stopped at the --timeout deadline after epoch {result.epoch + 1} of {record.epochs}")

        def on_backoff(micro: int) -> None:
            trial.set_user_attr("micro_batch", micro)
            self.say(trial, f"out of memory; micro-batch {micro} with gradient accumulation (effective batch {values['batch_size']})")

        try:
            return fit_model(
                inputs.model, optimizer, inputs.train_loader, inputs.val_loader, plan, device=setup.device, resume=resume, save=save,
                should_stop=self.should_stop, on_step=lambda: self.progress.advance(bar), on_epoch=on_epoch,
                on_epoch_start=lambda epoch: freeze_stages(model.backbone, record.stages if epoch < head_epochs else depth) if head_epochs else None,
                on_backoff=on_backoff,
            )
        except (FloatingPointError, OutOfMemory, optuna.TrialPruned) as exc:
            trial.set_user_attr("prune_reason", str(exc))
            self.say(trial, f"{'pruned, ' if not isinstance(exc, optuna.TrialPruned) else ''}{exc} ({described})")
            checkpoint.unlink(missing_ok=True)
            raise optuna.TrialPruned(str(exc)) from exc
        except TrialInterrupted as exc:
            trial.set_user_attr("resumable", str(exc))
            raise
        finally:
            self.progress.remove_task(bar)
            if self.overall is not None:
                self.progress.advance(self.overall)

    def finish(self, trial: optuna.Trial, values: dict[str, Any], model: torch.nn.Module, history: list[EpochResult],
               previous: Path | None) -> float | tuple[float, float]:
        """Write the trial's checkpoint, record its history, drop its epoch checkpoints; its score (and cost).

        Raises:
            UserError: The checkpoint could not be written (the trial is marked for resumption).
        """
        from safetensors.torch import save_model

        from tlengine._export import COSTS

        record = self.setup.record
        checkpoint = self.setup.run_dir / "trials" / f"{trial.number}.safetensors"
        try:
            save_model(model.cpu(), str(checkpoint))
        except OSError as exc:
            checkpoint.unlink(missing_ok=True)
            trial.set_user_attr("resumable", "its checkpoint could not be written")
            raise unwritable(checkpoint, exc) from exc
        trial.set_user_attr("checkpoint", str(checkpoint.resolve()))
        trial.set_user_attr("history", [asdict(h) for h in history])
        if "epoch_checkpoint" in trial.user_attrs:  # an exact probe has none
            Path(trial.user_attrs["epoch_checkpoint"]).unlink(missing_ok=True)
        if previous is not None:
            previous.unlink(missing_ok=True)
        described = self.describe(values)
        score = history[-1].score
        if not record.objectives:
            self.say(trial, f"{record.metric} {score:.4f} ({described})")
            return score
        cost = COSTS[record.objectives[1]](model.eval(), values["image_size"])
        self.say(trial, f"{record.metric} {score:.4f}, {record.objectives[1]} {cost:.3g} ({described})")
        return score, cost
