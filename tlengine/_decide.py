"""What a search decides from its data before the first trial, and what a resumed one reads back.

With several backbones, they are ranked first (:func:`rank`, :mod:`tlengine._rank`): the
top-ranked becomes the main one, which the checks below measure and the recipes train,
and those far below it leave the search. Then three cheap measurements, each printed as
one line and kept in the study record:

1. the evaluation crop (:func:`tlengine._augment.crop_check`): timm's centre crop or the
   whole image, for evaluation, the training views and the exported model;
2. horizontal flips (:func:`tlengine._augment.flip_check`): left out of every trial where
   they change what the images show;
3. the learning-rate range (:func:`tlengine._lrfind.lr_range_test`): where ``lr`` is
   searched and the recipes' rate.

Each is skipped where the user decided it (``--eval-crop``, ``hflip``, ``lr``). A resumed
study, and every worker of a study, adopts the decisions stored in it instead of measuring
again (:func:`adopt`), so that all its trials share them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tlengine._inputs import InputSource
    from tlengine._record import StudyRecord
    from tlengine._setup import SearchSetup


def rank(setup: SearchSetup, sources: Mapping[str, InputSource], log: Callable[[str], None]) -> SearchSetup:
    """``setup`` with its backbones ranked on their frozen features (printed, kept in the record): the best as its
    main backbone, those far below it out of the ``backbone`` dimension (unless ``--param backbone`` lists them);
    ``setup`` itself for a search of one backbone."""
    from tlengine._metrics import maximizes
    from tlengine._rank import logme, rank_backbones
    from tlengine._space import Dimension

    if not setup.candidates:
        return setup
    record, size, dim = setup.record, _check_size(setup), setup.space["backbone"]

    def score(spec: str) -> tuple[float, str]:
        probe = sources[spec].probe_features(setup.candidate(spec).base, size, count=False)
        if setup.rank == "logme":
            return logme(probe.train, probe.train_targets, task=record.task, outputs=record.num_outputs), probe.source
        return _probe_score(setup, probe), probe.source

    ranking = rank_backbones(list(dim.choices), score, method=setup.rank, metric="logme" if setup.rank == "logme" else record.metric,
                             higher_is_better=setup.rank == "logme" or maximizes(record.metric), forced=setup.keep_backbones)
    for line in ranking.lines():
        log(f"{setup.label}{line}")
    kept = ranking.kept
    backbone = (Dimension("backbone", "categorical", choices=kept, source=dim.source) if len(kept) > 1
                else Dimension("backbone", "fixed", value=kept[0], source=dim.source))
    setup = setup.with_main(ranking.best)
    record = dataclasses.replace(setup.record, ranking=ranking.to_dict(), space={**setup.record.space, "backbone": backbone.to_dict()})
    return dataclasses.replace(setup, space={**setup.space, "backbone": backbone}, record=record)


def _probe_score(setup: SearchSetup, probe: Any) -> float:
    """The exact linear probe's validation score on ``probe``'s features, in the study's metric."""
    import torch

    from tlengine._augment import _probe_outputs
    from tlengine._metrics import score

    record = setup.record
    weights = None if setup.class_weights is None else torch.as_tensor(setup.class_weights, dtype=torch.float32)
    (val,) = _probe_outputs(probe.train, probe.train_targets, [probe.val], task=record.task, metric=record.metric,
                            outputs=record.num_outputs, seed=setup.config.seed, class_weights=weights)
    return score(record.metric, val, probe.val_targets)


def decide(setup: SearchSetup, source: InputSource, log: Callable[[str], None]) -> tuple[SearchSetup, InputSource]:
    """``setup`` and ``source`` with the crop, the flips and the learning-rate range decided from the data."""
    from tlengine._augment import CHECK_IMAGES
    from tlengine._loaders import evenly_spaced

    crop = setup.eval_crop
    if crop == "auto" and not _crop_decided_here(setup):
        crop = "center"
    if crop != "auto" and not _flips_decided_here(setup) and not _lr_decided_here(setup):
        return _with_crop(setup, source, crop == "whole", None)
    size = _check_size(setup)
    data = setup.data
    picks = (evenly_spaced(len(data.train), CHECK_IMAGES), evenly_spaced(len(data.val), CHECK_IMAGES))
    targets = (_targets(data.train.targets, picks[0], data.task), _targets(data.val.targets, picks[1], data.task))
    features = _Features(source, setup.base, picks, size)
    if crop == "auto":
        setup, source = _decide_crop(setup, source, features, targets, log)
    else:
        setup, source = _with_crop(setup, source, crop == "whole", None)
    if _flips_decided_here(setup):
        setup = _decide_flips(setup, source, features, targets, log)
    if _lr_decided_here(setup):
        setup = _decide_lr(setup, source, size, log)
    return setup, source


def adopt(setup: SearchSetup, source: InputSource, saved: StudyRecord) -> tuple[SearchSetup, InputSource]:
    """``setup`` and ``source`` with the decisions of the study they resume (``saved``), measured by its first run."""
    from tlengine._space import Dimension

    if saved.ranking is not None and saved.backbone_spec in setup.record.backbones and "backbone" in saved.space:
        spec = saved.space["backbone"]
        backbone = Dimension("backbone", **{**spec, "choices": tuple(spec.get("choices", ()))})
        setup = setup.with_main(saved.backbone_spec)
        setup = dataclasses.replace(setup, space={**setup.space, "backbone": backbone},
                                    record=dataclasses.replace(setup.record, ranking=saved.ranking,
                                                               space={**setup.record.space, "backbone": spec}))
    if saved.data_config.get("crop_pct") != setup.record.data_config.get("crop_pct"):
        setup, source = _with_crop(setup, source, saved.data_config.get("crop_pct") == 1.0, saved.crop)
    space = dict(setup.space)
    for name, decided_here in (("hflip", _flips_decided_here), ("augment", _flips_decided_here), ("lr", _lr_decided_here)):
        if decided_here(setup) and name in saved.space:
            spec = saved.space[name]
            space[name] = Dimension(name, **{**spec, "choices": tuple(spec.get("choices", ()))})
    record = dataclasses.replace(setup.record, space={**setup.record.space, **{n: d.to_dict() for n, d in space.items()}},
                                 flips=saved.flips, crop=saved.crop, lr_test=saved.lr_test)
    return dataclasses.replace(setup, space=space, record=record), source


class _Features:
    """Pooled features of the checks' images in one view, computed once each.

    Where the checks cover whole splits (no more than :data:`~tlengine._augment.CHECK_IMAGES`
    images each), an unflipped view comes from :meth:`InputSource.probe_features`, so that with
    caches on it is computed once for the ranking, the checks and the exact linear probe's trial
    together (on fashion-mnist-2k the probe trial recomputed 2,500 images the checks had just seen).
    """

    def __init__(self, source: InputSource, base: torch.nn.Module, picks: tuple[list[int], list[int]], size: int) -> None:
        self.source, self.base, self.picks, self.size = source, base, picks, size
        data = source.data
        self.whole = len(picks[0]) == len(data.train) and len(picks[1]) == len(data.val)
        self.memo: dict[Any, Any] = {}

    def get(self, split: str, view: InputSource, flip: bool = False) -> Any:
        """Split ``split``'s features at ``view``'s preprocessing (mirrored when ``flip``)."""
        preprocess = view.preprocess(self.size)
        key = (split, preprocess, flip)
        if key not in self.memo:
            if self.whole and not flip:
                probe = view.probe_features(self.base, self.size, count=False)
                self.memo[("train", preprocess, False)], self.memo[("val", preprocess, False)] = probe.train, probe.val
            else:
                self.memo[key] = self.source.pooled(self.base, split, preprocess, self.picks[split == "val"], flip=flip)
        return self.memo[key]


def _decide_crop(setup: SearchSetup, source: InputSource, features: _Features, targets: tuple[Any, Any],
                 log: Callable[[str], None]) -> tuple[SearchSetup, InputSource]:
    from tlengine._augment import crop_check

    record = setup.record
    whole = source.with_data_config({**record.data_config, "crop_pct": 1.0})
    check = crop_check((features.get("train", source), features.get("val", source)),
                       (features.get("train", whole), features.get("val", whole)), *targets,
                       crop_pct=float(record.data_config.get("crop_pct") or 0.875), task=record.task, metric=record.metric,
                       outputs=record.num_outputs, seed=setup.config.seed)
    log(f"{setup.label}{check.line(record.metric)}")
    return _with_crop(setup, source, check.chosen == "whole", check.to_dict())


def _decide_flips(setup: SearchSetup, source: InputSource, features: _Features, targets: tuple[Any, Any],
                  log: Callable[[str], None]) -> SearchSetup:
    from tlengine._augment import flip_check

    record = setup.record
    check = flip_check(features.get("train", source), targets[0], features.get("val", source), features.get("val", source, flip=True),
                       targets[1], task=record.task, metric=record.metric, outputs=record.num_outputs, seed=setup.config.seed)
    log(f"{setup.label}{check.line(record.metric)}")
    if check.keep:
        return dataclasses.replace(setup, record=dataclasses.replace(setup.record, flips=check.to_dict()))
    return _with_space(setup, {"hflip": dataclasses.replace(setup.space["hflip"], value=0.0)}, flips=check.to_dict())


def _decide_lr(setup: SearchSetup, source: InputSource, size: int, log: Callable[[str], None]) -> SearchSetup:
    """Run the range test on the linear head and the trained stages (all of them, unless ``freeze_depth`` is
    fixed), on the evaluation view, at the first batch size."""
    from tlengine._inputs import InputRequest
    from tlengine._loaders import Augment
    from tlengine._lrfind import lr_range_test, training_loss
    from tlengine._model import build_trial_model
    from tlengine._runner import seed_everything
    from tlengine._train import param_groups

    space, record = setup.space, setup.record
    optimizer = setup.registry.optimizers[space["optimizer"].value]
    depth = space["freeze_depth"].value if space["freeze_depth"].kind == "fixed" else 0
    seed_everything(setup.config.seed)
    model = build_trial_model(setup.registry, record, {"head": "linear", "freeze_depth": depth},
                              backbone_state=setup.base.state_dict())
    batch = space["batch_size"]
    request = InputRequest(depth=depth, image_size=size, augment=Augment(None, 0.0, 0), mixup=False,
                           batch_size=batch.value if batch.kind == "fixed" else int(batch.choices[0] if batch.choices else batch.low),
                           epochs=1, shuffle_seed=setup.config.seed)
    inputs = source.with_data_config(source.data_config, early=False).inputs(model, model.backbone, request, count=False)
    wd = space["weight_decay"].value if space["weight_decay"].kind == "fixed" else 0.01
    extra = {p: space[f"{optimizer.name}.{p}"].value for p in optimizer.params if space[f"{optimizer.name}.{p}"].kind == "fixed"}

    def make(lr: float) -> Any:
        return optimizer.factory(param_groups(model, wd, 1.0), lr, wd, **extra)

    import torch

    try:
        test = lr_range_test(inputs.model, make, inputs.train_loader, loss_fn=training_loss(record.task, model, setup.device, setup.class_weights),
                             device=setup.device, bounds=optimizer.lr_range)
    except torch.OutOfMemoryError:  # the trials back off to micro-batches; the test keeps the optimizer's range
        inputs.model.cpu()
        log(f"{setup.label}learning rates: the range test ran out of memory at batch {request.batch_size}; "
            f"lr is searched in the optimizer's range {space['lr'].low:.1e}..{space['lr'].high:.1e}")
        return setup
    log(f"{setup.label}{test.line()}")
    lr = dataclasses.replace(space["lr"], low=test.low, high=test.high)
    return _with_space(setup, {"lr": lr}, lr_test=test.to_dict())


def _with_space(setup: SearchSetup, changed: dict[str, Any], **record_fields: Any) -> SearchSetup:
    """``setup`` with ``changed`` dimensions in its space and record (the policy's choices following ``hflip``)."""
    from tlengine._space import policy_dimension

    space = {**setup.space, **changed}
    if "hflip" in changed and space["augment"].source == "default" and space["augment"].searched:
        space["augment"] = policy_dimension(space)
    dims = {n: space[n].to_dict() for n in (*changed, "augment")}
    record = dataclasses.replace(setup.record, space={**setup.record.space, **dims}, **record_fields)
    return dataclasses.replace(setup, space=space, record=record)


def _with_crop(setup: SearchSetup, source: InputSource, whole: bool, check: dict[str, Any] | None) -> tuple[SearchSetup, InputSource]:
    """``setup`` and ``source`` evaluating on the whole image (``crop_pct`` 1) when ``whole``, else as they are."""
    if not whole:
        return dataclasses.replace(setup, record=dataclasses.replace(setup.record, crop=check)), source
    config = {**setup.record.data_config, "crop_pct": 1.0}
    record = dataclasses.replace(setup.record, data_config=config, crop=check)
    return dataclasses.replace(setup, record=record), source.with_data_config(config)


def _crop_decided_here(setup: SearchSetup) -> bool:
    """Whether there is a crop to decide: timm's crop fraction is below 1."""
    return float(setup.record.data_config.get("crop_pct") or 0.875) < 1.0


def _flips_decided_here(setup: SearchSetup) -> bool:
    """Whether the flips are tlengine's to decide: ``hflip`` is the default, fixed and not 0."""
    dim = setup.space["hflip"]
    return dim.source == "default" and not dim.searched and bool(dim.value)


def _lr_decided_here(setup: SearchSetup) -> bool:
    """Whether the learning-rate range is tlengine's to measure: ``lr`` is the default range, one optimizer
    (fixed), a ``linear`` head to build, and trials that train more than a linear probe solved exactly."""
    lr, opt, depth = setup.space["lr"], setup.space["optimizer"], setup.space["freeze_depth"]
    probes_only = depth.kind == "fixed" and depth.value >= setup.record.stages
    return lr.source == "default" and lr.searched and opt.kind == "fixed" and "linear" in setup.registry.heads and not probes_only


def _check_size(setup: SearchSetup) -> int:
    """The image size the checks run at: the fixed one, else the first listed, else the largest."""
    dim = setup.space["image_size"]
    return dim.value if not dim.searched else (dim.choices[0] if dim.kind == "categorical" else int(dim.high))


def _targets(targets: Any, picks: list[int], task: str) -> torch.Tensor:
    from tlengine._loaders import target_tensor

    return target_tensor([targets[i] for i in picks], task)
