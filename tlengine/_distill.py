"""Knowledge distillation: a student search taught by a finished trial (or the K best) of another study.

A distillation study is a search (:mod:`tlengine._search`) with a teacher: the same setup,
trial runner, caches, checkpoints, resume, workers and report, on the teacher study's data
and split. Each trial trains the student on

- classification: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``
  (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"), the teacher's
  probabilities at temperature ``T`` averaged over the K teachers of ``top:K``;
- regression: ``alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, targets)``, on
  standardised targets (the teacher's predictions averaged over K);

with ``alpha`` (``distill_alpha``) and ``T`` (``distill_temperature``) searched like any dimension.

**The teacher sees exactly the student's views.** A trial's training images, in every
epoch, are the augmented views the search's caches and loaders give it, seeded per image
and epoch (:func:`tlengine._loaders.image_seed`) whatever path trains them. The teacher's
outputs for one view of every training image are computed once, from those very pixels
(renormalised to the teacher's mean and std, and resized to its input size where it
differs), and kept (in the cache folder, keyed on the teacher's checkpoints, the view and
the images; in memory with ``--no-cache``), so a student trial on cached prefix features
reads them as it reads its features: the teacher's cost is paid once per view, not per
trial. To find a batch's outputs, the student's training targets are the images' indices
(:meth:`tlengine._inputs.InputSource.for_distillation`); the loss looks the true targets up.
Mixup and cutmix, which mix images the teacher never saw, are off in a distillation study; an
exact linear probe (the probe recipe, unless ``probe = "sgd"``) is solved on the labels alone,
a baseline the taught trials must beat.

None of timm, Optuna or torchvision ships a distillation loss with cached teacher
outputs; the loss here is the paper's, in a few lines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError

if TYPE_CHECKING:
    import optuna
    import torch

    from tlengine._inputs import InputRequest, InputSource
    from tlengine._loaders import Augment
    from tlengine._preprocess import Preprocess
    from tlengine._record import StudyRecord
    from tlengine.plugins import Registry


@dataclass(frozen=True)
class TeacherRef:
    """What ``tlengine distill`` names as the teacher.

    Attributes:
        study_name: The teacher's study (``--study-name``).
        which: ``best``, a trial number, or ``top:K`` (the K best trials, their outputs averaged).
        storage: Its storage URL (``--storage``), else found in ``runs``.
        runs: The folder of run folders (``--runs``).
    """

    study_name: str
    which: str = "best"
    storage: str | None = None
    runs: str = "runs"


@dataclass(frozen=True)
class Teacher:
    """The finished trials that teach a student.

    Attributes:
        study_name: Their study.
        storage: Its storage URL.
        trials: Their numbers, best first.
        record: Their study's record.
        values: Each trial's values.
        checkpoints: Each trial's checkpoint.
        scores: Each trial's validation score.
        digest: A hash of the checkpoints' bytes (what the cached outputs key on).
    """

    study_name: str
    storage: str
    trials: tuple[int, ...]
    record: StudyRecord
    values: tuple[Mapping[str, Any], ...]
    checkpoints: tuple[str, ...]
    scores: tuple[float, ...]
    digest: str

    @property
    def backbones(self) -> tuple[str, ...]:
        """Each trial's ``NAME:ARCH``."""
        return tuple(self.record.for_values(v).backbone_spec for v in self.values)

    def to_dict(self) -> dict[str, Any]:
        """What the student's study record keeps (and the exported model's metadata names)."""
        return {"study_name": self.study_name, "storage": self.storage, "trials": list(self.trials), "backbones": list(self.backbones),
                "image_sizes": [v["image_size"] for v in self.values], "scores": list(self.scores), "digest": self.digest,
                "metric": self.record.metric}

    def models(self, registry: Registry) -> list[torch.nn.Module]:
        """The trials' models, from their checkpoints, in eval mode."""
        from pathlib import Path

        from tlengine._model import build_trial_model

        return [build_trial_model(registry, self.record, values, checkpoint=Path(path)).eval()
                for values, path in zip(self.values, self.checkpoints)]


def load_teacher(ref: TeacherRef) -> Teacher:
    """The trials ``ref`` names, checked: complete, with their checkpoints on this machine.

    Raises:
        UserError: No such study or trial, ``top:K`` beyond the completed trials, a checkpoint missing.
    """
    import optuna

    from tlengine._record import read_record
    from tlengine._study import find_study, pick_trial

    study, storage = find_study(ref.study_name, ref.storage, ref.runs)
    record = read_record(study)
    if record.objectives and ref.which.startswith("top:"):
        raise UserError(f"--teacher {ref.which}: study {ref.study_name} has two objectives and no one order; pick a trial (--teacher N)")
    if ref.which.startswith("top:"):
        count = ref.which[4:]
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--teacher {ref.which}: expected best, a trial number, or top:K with K a positive integer")
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < int(count):
            raise UserError(f"--teacher {ref.which}: study {ref.study_name} has {len(complete)} completed trials")
        sign = -1 if study.directions[0].name == "MAXIMIZE" else 1
        trials = sorted(complete, key=lambda t: (sign * t.values[0], t.number))[: int(count)]
    else:
        if ref.which != "best" and not ref.which.isdigit():
            raise UserError(f"--teacher {ref.which}: expected best, a trial number, or top:K with K a positive integer")
        trials = [pick_trial(study, ref.which, "--teacher")]
    paths = []
    for trial in trials:
        path = trial.user_attrs.get("checkpoint", "")
        if not path or not __import__("pathlib").Path(path).is_file():
            raise UserError(f"--teacher {ref.which}: trial {trial.number}'s checkpoint {path or '(none)'} is not on this machine; "
                            "distil where the teacher's study ran")
        paths.append(path)
    return Teacher(ref.study_name, storage, tuple(t.number for t in trials), record,
                   tuple(t.user_attrs.get("values", t.params) for t in trials), tuple(paths), tuple(t.values[0] for t in trials),
                   _files_digest(paths))


def _files_digest(paths: Sequence[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_student(teacher: Teacher, *, task: str, classes: Sequence[str], students: Sequence[str], image_size: int | None) -> None:
    """Refuse a student that cannot learn from ``teacher``: another task or other classes, or the teacher itself
    (the same backbone at the same image size).

    Raises:
        UserError: Said which.
    """
    record = teacher.record
    if task != record.task:
        raise UserError(f"--task {task}: the teacher's study {teacher.study_name} is {record.task}; distil with the same task")
    if tuple(classes) != tuple(record.classes):
        raise UserError(f"--study-name {teacher.study_name}: the teacher was trained on other classes "
                        f"({', '.join(record.classes[:5])}{', ...' if len(record.classes) > 5 else ''}) than the data's")
    for spec in students:
        for backbone, values in zip(teacher.backbones, teacher.values):
            if spec == backbone and (image_size is None or image_size == values["image_size"]):
                raise UserError(f"--student {spec}: the same as the teacher (trial {teacher.trials[0]}, {backbone} at "
                                f"{values['image_size']}px); pick a smaller backbone or a smaller --image-size")


class Distiller:
    """The teacher's outputs on the student's views (computed once per view, cached), and each trial's loss.

    Args:
        teacher: The teacher.
        registry: The plugin registry (to rebuild the teacher's models).
        device: Where the teacher runs.
        store: The cache folder's store (outputs kept on disk), or ``None`` (in memory, this process only).
        cap_views: ``--cache-views``: a trial on cached features cycles through this many views.
        log: Where the one line per computed view goes.
    """

    def __init__(self, teacher: Teacher, registry: Registry, device: str, store: Any = None, cap_views: int | None = None,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.teacher, self.registry, self.device, self.store, self.cap_views, self.log = teacher, registry, device, store, cap_views, log
        self._models: list[torch.nn.Module] | None = None
        self._memory: dict[str, Any] = {}
        self.computed = 0
        self.reused = 0

    def models(self) -> list[torch.nn.Module]:
        """The teacher's models, built once."""
        if self._models is None:
            self._models = self.teacher.models(self.registry)
        return self._models

    def outputs(self, source: InputSource, preprocess: Preprocess, augment: Augment, view: int) -> Any:
        """``(N, K, C)`` float32 outputs of the K teachers on view ``view`` of every training image, as a trial at
        ``preprocess`` with ``augment`` sees it (logits, or standardised predictions), in memory."""
        import numpy as np

        from tlengine._store import digest
        from tlengine._timing import stage

        key = digest("teacher", self.teacher.digest, source.images_digest(), preprocess.to_dict(), augment.key(),
                     "identity" if augment.identity else view, source.augment_seed)
        if key in self._memory:
            self.reused += 1
            return self._memory[key]
        shape = (len(source.data.train), len(self.teacher.trials), self.teacher.record.num_outputs)
        fill = lambda out: self._fill(out, source, preprocess, augment, view)  # noqa: E731
        with stage("teacher"):
            before = self.computed
            array = self.store.get_or_make("teacher", key, shape, "float32", fill) if self.store is not None else None
            if array is None:  # no cache, or no room under its cap
                array = np.zeros(shape, dtype=np.float32)
                fill(array)
            if self.computed == before:
                self.reused += 1
        self._memory[key] = np.asarray(array, dtype=np.float32)
        return self._memory[key]

    def _fill(self, out: Any, source: InputSource, preprocess: Preprocess, augment: Augment, view: int) -> None:
        """Run every teacher over view ``view`` of the training images, a batch at a time, in order."""
        import torch

        from tlengine._preprocess import Preprocess as Pre

        self.computed += 1
        mean, std = torch.tensor(preprocess.mean).view(1, 3, 1, 1), torch.tensor(preprocess.std).view(1, 3, 1, 1)
        record, models = self.teacher.record, self.models()
        theirs = [Pre.from_data_config(record.for_values(v).data_config, v["image_size"]) for v in self.teacher.values]
        for model in models:
            model.to(self.device)
        try:
            with torch.inference_mode():
                for x, index in source.view_batches(preprocess, augment, view):
                    pixels, ys = x.float().cpu() * std + mean, []  # the student's pixels, in [0, 1]
                    for model, pre in zip(models, theirs):
                        t_mean, t_std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
                        xt = (pixels - t_mean) / t_std
                        if xt.shape[-1] != pre.input_size:
                            xt = torch.nn.functional.interpolate(xt, size=(pre.input_size,) * 2, mode="bilinear", antialias=True,
                                                                 align_corners=False)
                        y = model(xt.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()
                        ys.append(y.reshape(len(y), -1))
                    out[int(index[0]):int(index[-1]) + 1] = torch.stack(ys, 1).numpy()
        finally:
            for model in models:
                model.cpu()
        self.log(f"teacher: outputs of {len(models)} model(s) on {'the evaluation view' if augment.identity else f'view {view}'} of "
                 f"{len(source.data.train)} training images, computed once")

    def loss(self, values: Mapping[str, Any], source: InputSource, request: InputRequest, *, on_features: bool, true_targets: torch.Tensor,
             task: str, label_smoothing: float, class_weights: Sequence[float] | None) -> DistillLoss:
        """The loss of one trial: its ``alpha`` and ``T``, the views it trains on (a trial on cached features cycles
        through ``--cache-views`` of them), ``true_targets`` (class indices, or standardised targets) by image."""
        preprocess = source.preprocess(request.image_size)
        views = min(self.cap_views or request.epochs, request.epochs) if on_features else request.epochs
        return DistillLoss(self, source, preprocess, request.augment, views, task, float(values["distill_alpha"]),
                           float(values.get("distill_temperature") or 1.0), true_targets, label_smoothing, class_weights)

    def summary(self) -> str | None:
        """One line on the teacher's outputs: views computed and reused."""
        if not self.computed and not self.reused:
            return None
        return f"teacher outputs: {self.computed} view(s) computed, {self.reused} reused"


@dataclass
class DistillLoss:
    """``loss(student_outputs, image_indices, epoch)`` of one trial; see the module docstring."""

    distiller: Distiller
    source: InputSource
    preprocess: Preprocess
    augment: Augment
    views: int
    task: str
    alpha: float
    temperature: float
    true_targets: torch.Tensor
    label_smoothing: float = 0.0
    class_weights: Sequence[float] | None = None
    _tables: dict[int, Any] = field(default_factory=dict)

    def targets(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """The teachers' outputs ``(K, B, C)`` on the views of epoch ``epoch`` of images ``index``."""
        import torch

        view = epoch % self.views
        if view not in self._tables:
            self._tables[view] = self.distiller.outputs(self.source, self.preprocess, self.augment, view)
        return torch.from_numpy(self._tables[view][index.cpu().numpy()]).transpose(0, 1)

    def __call__(self, out: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        index = index.long()
        teacher = self.targets(epoch, index).to(out.device)
        y = self.true_targets.to(out.device)[index]
        out = out.float()
        if self.task == "regression":
            hard = F.mse_loss(out.squeeze(-1), y)
            soft = F.mse_loss(out.squeeze(-1), teacher.mean(0).squeeze(-1))
            return self.alpha * soft + (1 - self.alpha) * hard
        weight = torch.tensor(self.class_weights, device=out.device) if self.class_weights else None
        hard = F.cross_entropy(out, y, weight=weight, label_smoothing=self.label_smoothing)
        t = self.temperature
        probs = torch.softmax(teacher / t, dim=-1).mean(0)  # an ensemble of K: their probabilities averaged
        soft = F.kl_div(F.log_softmax(out / t, dim=-1), probs, reduction="batchmean") * t * t
        return self.alpha * soft + (1 - self.alpha) * hard


def distillation_dimensions(task: str) -> dict[str, tuple[Any, bool, str]]:
    """The dimensions a distillation study adds (default spec, integer?, meaning); documented in docs/search-space.md."""
    dims = {"distill_alpha": ({"low": 0.1, "high": 0.9}, False, "weight of the teacher's soft targets in the loss (1 - it: the labels)")}
    if task == "classification":
        dims["distill_temperature"] = ({"low": 1.0, "high": 8.0}, False, "softmax temperature of teacher and student in the KL term")
    return dims


def default_study_name(teacher: str, students: Sequence[str]) -> str:
    """``TEACHER-distill-ARCH``."""
    return f"{teacher}-distill-{students[0].rpartition(':')[2]}" + (f"+{len(students) - 1}" if len(students) > 1 else "")


def comparison(teacher: Teacher, registry: Registry, study: optuna.Study, record: StudyRecord, data: Any) -> dict[str, Any] | None:
    """Teacher and best student side by side: validation score, parameters (millions) and ONNX latency at batch 1 (ms,
    summed over the models of an ensemble); ``None`` before a student trial completes."""
    from pathlib import Path

    from tlengine._export import onnx_latency, parameter_count
    from tlengine._model import build_trial_model
    from tlengine._study import pick_trial

    try:
        best = pick_trial(study, "best")
    except UserError:
        return None
    values = best.user_attrs.get("values", best.params)
    student = build_trial_model(registry, record, values, checkpoint=Path(best.user_attrs.get("checkpoint", ""))).eval()
    models = teacher.models(registry)
    sizes = [v["image_size"] for v in teacher.values]
    return {
        "teacher": {"trials": list(teacher.trials), "score": ensemble_score(teacher, models, data),
                    "params_m": sum(parameter_count(m, s) for m, s in zip(models, sizes)),
                    "latency_ms": sum(onnx_latency(m, s) for m, s in zip(models, sizes)), "backbones": list(teacher.backbones)},
        "student": {"trial": best.number, "score": best.values[0], "params_m": parameter_count(student, values["image_size"]),
                    "latency_ms": onnx_latency(student, values["image_size"]), "backbone": record.for_values(values).backbone_spec},
    }


def ensemble_score(teacher: Teacher, models: Sequence[torch.nn.Module], data: Any) -> float:
    """The teacher's validation score: its trial's, or, for ``top:K``, that of the K models' averaged probabilities
    (classification) or predictions (regression), on the validation images at each one's preprocessing."""
    import torch

    from tlengine._loaders import eval_loader
    from tlengine._metrics import score
    from tlengine._preprocess import Preprocess

    if len(models) == 1:
        return float(teacher.scores[0])
    record, outputs, targets = teacher.record, [], None
    for model, values in zip(models, teacher.values):
        preprocess = Preprocess.from_data_config(record.for_values(values).data_config, values["image_size"])
        batches, ys = [], []
        with torch.inference_mode():
            for x, y in eval_loader(data.val, record.task, preprocess, "cpu"):
                out = model(x).float()
                batches.append(torch.softmax(out, -1) if record.task == "classification" else out * model.target_std + model.target_mean)
                ys.append(y)
        outputs.append(torch.cat(batches))
        targets = torch.cat(ys)
    mean = torch.stack(outputs).mean(0)
    return float(score(record.metric, mean.log() if record.task == "classification" else mean.squeeze(-1), targets))
