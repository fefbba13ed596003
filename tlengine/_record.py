"""The study record: what a study was made for, stored in the study and read back by every command."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError

if TYPE_CHECKING:
    import optuna

    from tlengine._space import Dimension

#: The key of the record among the study's user attributes.
RECORD_KEY = "tlengine"


@dataclass(frozen=True)
class StudyRecord:
    """A study's configuration: written once by the search that makes the study, read by export,
    report, show and every resuming worker through :func:`read_record`.

    Stored as a JSON dict in the study's user attributes, so any storage holds it and older
    studies (whose dict lacks the newer keys) still read back with their defaults.

    The backbone fields (``backbone``, ``arch``, ``stages``, ``data_config``) name the study's main
    backbone: its only one, or, when several are searched, the one ranked first (recipes run on it,
    the checks before the first trial measure it). :meth:`for_values` gives the record a trial of
    another candidate reads.

    Attributes:
        backbone: The backbone plugin's name.
        arch: The architecture it was given (``None`` when the plugin takes none).
        weights: ``--weights`` as given.
        task: ``classification`` or ``regression``.
        classes: Class names by index (empty for regression).
        epochs: Epochs per trial.
        metric: The validation metric (the first objective).
        objectives: ``(metric, cost)`` of a multi-objective study, else ``None``.
        class_weights: Whether the loss is weighted by inverse class frequency.
        stages: The backbone's stage count (the deepest freeze depth).
        data_config: timm's ``mean``, ``std``, ``interpolation`` and ``crop_pct`` of the backbone.
        target_mean: Regression targets' training mean (0 for classification).
        target_std: Their standard deviation (1 for classification).
        dataset: The dataset plugin's name.
        data: ``--data``, resolved to an absolute path where it is one.
        val_fraction: ``--val-fraction``.
        seed: ``--seed``.
        space: Every dimension of the search space, as :meth:`Dimension.to_dict` gives it.
        early: ``{"image_size", "epochs"}`` of ``--early-size``, or ``None``.
        confine_paths: ``--confine-paths`` (reloading the data honours it).
        image_column: ``--image-column`` (reloading the data reads the same column).
        target_column: ``--target-column``.
        flips: What the flip check measured and decided (:class:`tlengine._augment.FlipCheck`), or ``None``.
        crop: What the crop check measured and decided (:class:`tlengine._augment.CropCheck`), or ``None``.
        lr_test: The learning-rate range test's curve and suggestion (:class:`tlengine._lrfind.LRTest`), or ``None``.
        max_bad_images: ``--max-bad-images`` (reloading the data drops unreadable images as the search did).
        candidates: The backbones searched when there are several, as given: ``{"spec", "backbone", "arch",
            "stages", "data_config"}`` each; empty for a study of one backbone.
        ranking: How the candidates ranked before the first trial (:class:`tlengine._rank.Ranking`), or ``None``.
        teacher: A distillation study's teacher (:meth:`tlengine._distill.Teacher.to_dict`: its study, trials,
            backbones, scores and checkpoints' digest), or ``None``.
    """

    backbone: str
    arch: str | None
    weights: str
    task: str
    classes: tuple[str, ...]
    epochs: int
    metric: str
    objectives: tuple[str, ...] | None
    class_weights: bool
    stages: int
    data_config: Mapping[str, Any]
    target_mean: float
    target_std: float
    dataset: str
    data: str | None
    val_fraction: float = 0.2
    seed: int = 0
    space: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    early: Mapping[str, int] | None = None
    confine_paths: bool = False
    max_bad_images: float = 0.01
    image_column: str | None = None
    target_column: str | None = None
    flips: Mapping[str, Any] | None = None
    crop: Mapping[str, Any] | None = None
    lr_test: Mapping[str, Any] | None = None
    candidates: tuple[Mapping[str, Any], ...] = ()
    ranking: Mapping[str, Any] | None = None
    teacher: Mapping[str, Any] | None = None

    #: Fields that define the objective: a study resumed with other values is refused.
    OBJECTIVE = ("backbone", "arch", "weights", "task", "classes", "epochs", "metric", "objectives", "class_weights",
                 "dataset", "data", "val_fraction", "space", "early", "image_column", "target_column", "candidates",
                 "teacher")

    @property
    def backbone_spec(self) -> str:
        """``NAME:ARCH`` (or ``NAME``), as ``--backbone`` takes it."""
        return f"{self.backbone}:{self.arch}" if self.arch else self.backbone

    @property
    def backbones(self) -> tuple[str, ...]:
        """Every backbone the study searches, as ``--backbone`` takes them (the main one alone for one)."""
        return tuple(c["spec"] for c in self.candidates) or (self.backbone_spec,)

    def short_names(self) -> dict[str, str]:
        """Each backbone's shortest name that tells it from the others: the last words of its architecture
        (``lite0`` for ``timm:tf_efficientnet_lite0`` beside ``lite1``), for tables and plot legends."""
        specs = self.backbones
        words = {spec: spec.rpartition(":")[2].split("_") for spec in specs}
        for count in range(1, max(len(w) for w in words.values()) + 1):
            names = {spec: "_".join(w[-count:]) for spec, w in words.items()}
            if len(set(names.values())) == len(names):
                return names
        return {spec: spec for spec in specs}

    def for_backbone(self, spec: str) -> StudyRecord:
        """This record with candidate ``spec`` as its backbone (its stages and preprocessing; the evaluation
        crop the search decided applies to every candidate).

        Raises:
            UserError: ``spec`` is not one of the study's backbones.
        """
        if spec == self.backbone_spec:
            return self
        found = next((c for c in self.candidates if c["spec"] == spec), None)
        if found is None:
            raise UserError(f"backbone {spec!r} is not one of this study's ({', '.join(self.backbones)})")
        data_config = dict(found["data_config"])
        if self.data_config.get("crop_pct") == 1.0:
            data_config["crop_pct"] = 1.0
        return dataclasses.replace(self, backbone=found["backbone"], arch=found["arch"], stages=found["stages"], data_config=data_config)

    def for_values(self, values: Mapping[str, Any]) -> StudyRecord:
        """The record a trial with these values reads: :meth:`for_backbone` of its ``backbone``, if it has one."""
        spec = values.get("backbone")
        return self if spec is None else self.for_backbone(spec)

    @property
    def num_outputs(self) -> int:
        """Outputs of the head: one per class, or one for regression."""
        return len(self.classes) if self.task == "classification" else 1

    @property
    def cost(self) -> str | None:
        """The second objective (``latency``, ``params``) of a multi-objective study."""
        return self.objectives[1] if self.objectives else None

    def dimensions(self) -> dict[str, Dimension]:
        """The search space as :class:`~tlengine._space.Dimension` objects."""
        from tlengine._space import Dimension

        return {name: Dimension(name, **{**spec, "choices": tuple(spec.get("choices", ()))}) for name, spec in self.space.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict stored in the study."""
        out = dataclasses.asdict(self)
        out["classes"] = list(self.classes)
        out["objectives"] = list(self.objectives) if self.objectives else None
        out["candidates"] = [dict(c) for c in self.candidates]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StudyRecord:
        """Read a stored dict back; keys it lacks take their defaults, unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        values["classes"] = tuple(values.get("classes", ()))
        values["objectives"] = tuple(values["objectives"]) if values.get("objectives") else None
        values["candidates"] = tuple(values.get("candidates") or ())
        return cls(**values)

    def conflict(self, saved: StudyRecord) -> str | None:
        """Why ``saved`` (the study's record) was made for another objective than this one, or ``None``."""
        import json

        mine, theirs = json.loads(json.dumps(self.to_dict())), saved.to_dict()  # tuples as the stored JSON has them: lists
        for key in self.OBJECTIVE:
            if mine[key] == theirs[key]:
                continue
            if key == "space":
                changed = sorted(k for k in set(mine["space"]) | set(theirs["space"]) if mine["space"].get(k) != theirs["space"].get(k))
                return f"this study searched another space ({', '.join(changed)} differ); rerun with the same config or choose another --study-name"
            return (f"this study was made with {key}={theirs[key]!r}, not {mine[key]!r}; "
                    "rerun with the same options or choose another --study-name")
        return None


def read_record(study: optuna.Study) -> StudyRecord:
    """The record of a tlengine study.

    Raises:
        UserError: The study was not made by tlengine.
    """
    raw = study.user_attrs.get(RECORD_KEY)
    if not isinstance(raw, Mapping):
        raise UserError(f"--study-name {study.study_name}: not a tlengine study")
    required = [f.name for f in dataclasses.fields(StudyRecord) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise UserError(f"--study-name {study.study_name}: its tlengine record lacks {', '.join(missing)}; "
                        "it was not made by tlengine search (or was edited), so it cannot be read")
    return StudyRecord.from_dict(raw)


def write_record(study: optuna.Study, record: StudyRecord) -> None:
    """Store ``record`` in ``study``."""
    study.set_user_attr(RECORD_KEY, record.to_dict())
