"""Every user mistake in docs/errors.md: one ``error:`` line, exit code 2, no traceback.

The table below drives both the checks and the documentation test: each case's
message, with ``{tmp}`` written as ``DIR``, must appear in docs/errors.md.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, TINY_BACKBONE, write_image_folder

TINY = ["--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "1", "--epochs", "1", "--image-size", "32"]
TWO = f"{TINY_BACKBONE},timm:resnet10t"


@dataclass(frozen=True)
class Case:
    mistake: str
    setup: Callable[[Path], list[str]]
    message: str  # the start of the error line; {tmp} is the test's folder


def png(path: Path, value: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


def folder_with(tmp: Path, layout: dict[str, int]) -> Path:
    for name, count in layout.items():
        for i in range(count):
            png(tmp / "d" / name / f"{i}.png", i * 20)
    return tmp / "d"


def csv_file(tmp: Path, text: str, name: str = "d.csv", encoding: str = "utf-8") -> Path:
    for i in range(3):
        png(tmp / f"{i}.png", i * 40)
    (tmp / name).write_bytes(text.encode(encoding))
    return tmp / name


def one_bad_image(tmp: Path) -> Path:
    write_image_folder(tmp / "b", 4, 2)
    (tmp / "b" / "train" / "t-shirt" / "bad.png").write_bytes(b"")
    return tmp / "b"


def study_then_other_direction(tmp: Path) -> list[str]:
    """Run a regression study minimising RMSE, then ask the same study to maximise R²."""
    from tlengine._cli import main

    rows = ["image,target"] + [f"{i % 3}.png,{i * 0.1:.1f}" for i in range(12)]
    data = str(csv_file(tmp, "\n".join(rows)))
    base = search("--data", data, "--task", "regression", *TINY, "--out", str(tmp), "--study-name", "s")
    assert main(base) == 0
    return base + ["--metric", "r2"]


def empty_study(tmp: Path) -> str:
    """A tlengine study without trials yet, as a search leaves it when it starts."""
    import optuna

    from tlengine._record import StudyRecord, write_record

    storage = f"sqlite:///{tmp}/s.db"
    record = StudyRecord(backbone="timm", arch="resnet18", weights="none", task="classification", classes=("a", "b"), epochs=1,
                         metric="accuracy", objectives=None, class_weights=False, stages=5, data_config={}, target_mean=0.0,
                         target_std=1.0, dataset="imagefolder", data=str(tmp))
    write_record(optuna.create_study(study_name="s", storage=storage), record)
    return storage


def search(*args: str) -> list[str]:
    return ["search", *args]


def weights_of(arch: str, tmp: Path) -> str:
    import timm
    import torch

    torch.save(timm.create_model(arch).state_dict(), tmp / "w.pth")
    return str(tmp / "w.pth")


def pickled_code(tmp: Path) -> str:
    import pickle

    class Runs:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp / "w.pth").write_bytes(pickle.dumps({"x": Runs()}))
    return str(tmp / "w.pth")


def plain_onnx(tmp: Path) -> str:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["image"], ["output"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp / "plain.onnx"))
    return str(tmp / "plain.onnx")


CASES = [
    # data
    Case("`--data` does not exist", lambda t: search("--data", f"{t}/nope"), "error: --data {tmp}/nope: no such file or folder"),
    Case("`--data` is an empty folder", lambda t: (t / "e").mkdir() or search("--data", f"{t}/e"),
         "error: --data {tmp}/e: the folder is empty; put each class's images in a folder named after the class"),
    Case("images but no class subfolders", lambda t: png(t / "l" / "a.png") and search("--data", f"{t}/l"),
         "error: --data {tmp}/l: the folder has no class subfolders; put each class's images in a folder named after the class"),
    Case("class folders without images", lambda t: folder_with(t, {"a": 0, "b": 0}) and [(t / "d" / n).mkdir(parents=True) for n in "ab"] and search("--data", f"{t}/d"),
         "error: --data {tmp}/d: no images found in its class folders"),
    Case("a class with a single image", lambda t: search("--data", str(folder_with(t, {"a": 3, "b": 1}))),
         "error: --data {tmp}/d: class 'b' has a single image; each class needs at least two (one to train on, one to validate), or remove the class"),
    Case("validation classes absent from training", lambda t: write_image_folder(t / "v", 2, 2) and (t / "v" / "val" / "extra").mkdir() or search("--data", f"{t}/v"),
         "error: --data {tmp}/v/val: classes extra have no training images in {tmp}/v/train"),
    Case("only one class", lambda t: search("--data", str(folder_with(t, {"a": 4}))),
         "error: {tmp}/d: classification needs at least two classes, found 1"),
    Case("CSV missing", lambda t: search("--data", f"{t}/none.csv"), "error: --data {tmp}/none.csv: no such file"),
    Case("CSV empty", lambda t: search("--data", str(csv_file(t, ""))), "error: --data {tmp}/d.csv: the CSV is empty"),
    Case("CSV without the expected columns", lambda t: search("--data", str(csv_file(t, "picture,kind\n0.png,a\n"))),
         "error: --data {tmp}/d.csv: cannot tell which columns hold the images and the targets (header: picture, kind); name them with "
         "--image-column and --target-column (found by name: image/path/file/filename/filepath and label/class/target/value/y)"),
    Case("CSV with a header and no rows", lambda t: search("--data", str(csv_file(t, "image,label\n"))),
         "error: --data {tmp}/d.csv: the CSV has a header but no rows"),
    Case("CSV row shorter than its header", lambda t: search("--data", str(csv_file(t, "image,label\n0.png\n"))),
         "error: --data {tmp}/d.csv: line 2 has 1 fields, the header has 2"),
    Case("numeric labels for classification", lambda t: search("--data", str(csv_file(t, "image,label\n" + "".join(f"{i % 3}.png,{i * 1.5}\n" for i in range(40))))),
         "error: --data {tmp}/d.csv: column 'label' holds 40 different numbers, which looks like a regression target; pass --task regression (or use text labels)"),
    Case("text targets for regression", lambda t: search("--data", str(csv_file(t, "image,target\n0.png,1.5\n1.png,tall\n")), "--task", "regression"),
         "error: --data {tmp}/d.csv: target 'tall' is not a number; regression needs numeric targets"),
    Case("CSV rows whose images are missing, more than `--max-bad-images`",
         lambda t: search("--data", str(csv_file(t, "image,label\nnope.png,a\nnope2.png,a\nnope3.png,b\nnope4.png,b\n"))),
         "error: --max-bad-images 0.01: 4 of 4 images cannot be used (4 missing), e.g. {tmp}/nope"),
    Case("`--target-column` not in the CSV", lambda t: search("--data", str(csv_file(t, "image,label\n0.png,a\n")), "--target-column", "angle"),
         "error: --target-column angle: {tmp}/d.csv has no such column; its header is image, label"),
    Case("image path outside the CSV's folder, with `--confine-paths`",
         lambda t: (t / "sub").mkdir() or search("--data", str(csv_file(t / "sub", "image,label\n../x.png,a\n")), "--confine-paths"),
         "error: --data {tmp}/sub/d.csv: line 2: image '../x.png' is outside the CSV's folder (--confine-paths)"),
    Case("CSV not in UTF-8", lambda t: search("--data", str(csv_file(t, "image,label\n0.png,caf\u00e9\n", encoding="latin-1"))),
         "error: --data {tmp}/d.csv: not UTF-8 text; save the CSV as UTF-8"),
    # images
    Case("more unreadable images than `--max-bad-images`",
         lambda t: one_bad_image(t) and search("--data", f"{t}/b", "--max-bad-images", "0", *TINY),
         "error: --max-bad-images 0: 1 of 13 images cannot be used (1 unreadable), e.g. {tmp}/b/train/t-shirt/bad.png (UnidentifiedImageError"),
    # names and options
    Case("unknown backbone", lambda t: search("--backbone", "resnet19"), "error: --backbone: unknown backbone 'resnet19' (did you mean 'resnet18'"),
    Case("unknown architecture of a backbone", lambda t: search("--backbone", "timm:resnet19"),
         "error: --backbone: unknown timm architecture 'timm:resnet19' (did you mean 'resnet18'"),
    Case("unknown head", lambda t: search("--head", "mpl"), "error: --head: unknown head 'mpl' (did you mean 'mlp'?); known: linear, mlp"),
    Case("unknown dataset", lambda t: search("--dataset", "imagefoldr"),
         "error: --dataset: unknown dataset 'imagefoldr' (did you mean 'imagefolder'?); known: csv, demo, imagefolder"),
    Case("unknown optimizer", lambda t: search("--optimizer", "adamww"), "error: --optimizer: unknown optimizer 'adamww' (did you mean 'adamw'?); known: adamw, sgd"),
    Case("unknown sampler", lambda t: search("--sampler", "tpee"), "error: --sampler: unknown sampler 'tpee' (did you mean 'tpe'?); known: grid, random, tpe"),
    Case("unknown pruner", lambda t: search("--pruner", "medain"), "error: --pruner: unknown pruner 'medain' (did you mean 'median'?); known: hyperband, median, none"),
    Case("zero trials", lambda t: search("--trials", "0"), "error: --trials 0: must be a positive integer"),
    Case("negative epochs", lambda t: search("--epochs", "-1"), "error: --epochs -1: must be a positive integer"),
    Case("zero batch size", lambda t: search("--batch-size", "0"), "error: --batch-size 0: must be a positive integer"),
    Case("zero cache size", lambda t: search("--cache-size-gb", "0"), "error: --cache-size-gb 0: must be a positive number of gigabytes"),
    Case("zero cached views", lambda t: search("--cache-views", "0"), "error: --cache-views 0: must be a positive integer"),
    Case("every epoch at the early size", lambda t: search("--data", str(write_image_folder(t / "f", 2, 2)), *TINY, "--epochs", "2",
                                                            "--early-size", "16", "--early-epochs", "2"),
         "error: --early-epochs 2: must be fewer than the 2 epochs per trial (--epochs), so that every trial ends at its own image size"),
    Case("an early size the backbone cannot take", lambda t: search("--data", str(write_image_folder(t / "f", 2, 2)), "--backbone", "timm:test_vit",
                                                                    "--weights", "none", "--early-size", "24"),
         "error: --early-size 24: the backbone cannot take it"),
    Case("an image size the backbone cannot take", lambda t: search("--data", str(write_image_folder(t / "f", 2, 2)), "--backbone", "timm:test_vit", "--weights", "none", "--image-size", "33"),
         "error: --image-size 33: the backbone cannot take it"),
    Case("malformed TOML config", lambda t: (t / "c.toml").write_text("[search\n") and search("--config", f"{t}/c.toml"),
         "error: --config {tmp}/c.toml: not valid TOML ("),
    Case("unknown key in the config's [space]", lambda t: (t / "c.toml").write_text("[space]\nlearning_rate = 1e-3\n") and search("--config", f"{t}/c.toml", *TINY, "--data", str(write_image_folder(t / "f", 2, 2))),
         "error: --config {tmp}/c.toml: unknown key 'learning_rate' in [space] (did you mean 'lr'?); see docs/search-space.md"),
    Case("unknown key in the config's [search]", lambda t: (t / "c.toml").write_text("[search]\ntrails = 3\n") and search("--config", f"{t}/c.toml"),
         "error: --config {tmp}/c.toml: unknown key 'trails' in [search] (did you mean 'trials'?)"),
    Case("malformed value in the config", lambda t: (t / "c.toml").write_text("[space]\nlr = {low = 1e-2, high = 1e-4}\n") and search("--config", f"{t}/c.toml", *TINY, "--data", str(write_image_folder(t / "f", 2, 2))),
         "error: --config {tmp}/c.toml: lr range needs low < high, got 0.01 and 0.0001"),
    Case("unknown `--param`", lambda t: search("--param", "layer_decy=0.8", *TINY, "--data", str(write_image_folder(t / "f", 2, 2))),
         "error: --param layer_decy: unknown parameter 'layer_decy' (did you mean 'layer_decay'?); see docs/search-space.md"),
    Case("unknown augmentation policy", lambda t: search("--param", "augment=cropp", *TINY, "--data", str(write_image_folder(t / "f", 2, 2))),
         "error: --param augment: augment = 'cropp' must be a policy: none, flip, crop, randaugment"),
    Case("unknown `--eval-crop`", lambda t: search("--eval-crop", "centre"), "error: --eval-crop centre: expected auto, center, whole"),
    Case("unknown metric", lambda t: search("--metric", "acuracy", *TINY, "--data", str(write_image_folder(t / "f", 2, 2))),
         "error: --metric: unknown metric 'acuracy' (did you mean 'accuracy'?)"),
    Case("`--device cuda` without CUDA", lambda t: search("--device", "cuda"), "error: --device cuda: CUDA is not available on this machine; use --device cpu or auto"),
    Case("`--devices` without CUDA", lambda t: search("--devices", "0,1"), "error: --devices 0,1: CUDA is not available on this machine; use --workers N to run several workers on the CPU"),
    # storage and studies
    Case("malformed storage URL", lambda t: search("--storage", "notaurl", *TINY), "error: --storage notaurl: cannot open it"),
    Case("a database that cannot be reached", lambda t: search("--storage", f"sqlite:///{t}/no/such/dir/s.db", *TINY),
         "error: --storage sqlite:///{tmp}/no/such/dir/s.db: cannot open it"),
    Case("an existing study with the other direction", study_then_other_direction,
         "error: --study-name s: the study minimizes, not maximizes; choose another --study-name"),
    Case("export from a study that does not exist", lambda t: ["export", "--storage", f"sqlite:///{t}/s.db", "--study-name", "nope"],
         "error: --study-name nope: no such study in sqlite:///{tmp}/s.db; it has: none"),
    Case("`show`, `report` or `export` of a study with no database in `--runs`", lambda t: ["show", "--runs", f"{t}/runs", "--study-name", "nope"],
         "error: --study-name nope: no study database at {tmp}/runs/nope; pass --storage"),
    Case("`report --out` where it cannot be written", lambda t: (t / "file").write_text("x") and ["report", "--storage", empty_study(t), "--study-name", "s", "--out", f"{t}/file/r.html"],
         "error: {tmp}/file/r.html: cannot write the report (Not a directory)"),
    # weights and models
    Case("weights file missing", lambda t: search("--backbone", TINY_BACKBONE, "--weights", f"{t}/w.pth"), "error: --weights {tmp}/w.pth: {tmp}/w.pth does not exist"),
    Case("weights of another architecture", lambda t: search("--backbone", TINY_BACKBONE, "--weights", weights_of("resnet10t", t)),
         "error: --weights {tmp}/w.pth: {tmp}/w.pth does not fit test_efficientnet:"),
    Case("weights not loadable with `weights_only=True`", lambda t: search("--backbone", TINY_BACKBONE, "--weights", pickled_code(t)),
         "error: --weights {tmp}/w.pth: {tmp}/w.pth is not loadable as plain weights with weights_only=True (UnpicklingError)"),
    Case("`predict` given a file that is not an ONNX model", lambda t: (t / "x.onnx").write_text("no") and ["predict", f"{t}/x.onnx", str(png(t / "i.png"))],
         "error: {tmp}/x.onnx: not a readable ONNX model"),
    Case("`predict` given an ONNX model without tlengine metadata", lambda t: ["predict", plain_onnx(t), str(png(t / "i.png"))],
         "error: {tmp}/plain.onnx: has no tlengine metadata; export it with 'tlengine search'"),
    # environment
    Case("output folder not writable", lambda t: (t / "file").write_text("x") and search("--data", str(write_image_folder(t / "f", 2, 2)), *TINY, "--out", f"{t}/file/runs", "--study-name", "s"),
         "error: --out {tmp}/file/runs: cannot create {tmp}/file/runs/s (Not a directory); choose a writable folder"),
    Case("cache folder not writable", lambda t: (t / "file").write_text("x") and search("--data", str(write_image_folder(t / "f", 2, 2)), *TINY, "--out", f"{t}/runs", "--cache-dir", f"{t}/file/cache"),
         "error: --cache-dir {tmp}/file/cache: cannot create it (Not a directory); choose a writable folder or pass --no-cache"),
    # several backbones
    Case("an unknown name in a list of backbones", lambda t: search("--backbone", f"{TINY_BACKBONE},resnet19q"),
         "error: --backbone: unknown backbone 'resnet19q' (did you mean"),
    Case("a backbone listed twice", lambda t: search("--backbone", f"{TINY_BACKBONE},test_efficientnet"),
         "error: --backbone: timm:test_efficientnet is listed twice"),
    Case("the grid sampler over several backbones", lambda t: search("--backbone", TWO, "--sampler", "grid"),
         "error: --sampler grid: cannot search several backbones (each has its own freeze depths); use tpe or random"),
    Case("one weights file for several backbones", lambda t: search("--backbone", TWO, "--weights", f"{t}/w.safetensors"),
         "error: --weights {tmp}/w.safetensors: one weights file cannot fit 2 backbones; use --weights auto (installed weight packages, "
         "else the hub) or search one backbone"),
    Case("a fixed freeze depth deeper than one of the backbones",
         lambda t: search("--data", str(write_image_folder(t / "f", 2, 2)), *TINY, "--backbone", TWO, "--param", "freeze_depth=6"),
         "error: --param freeze_depth: freeze_depth = 6 is deeper than the 5 stages of one of the backbones searched; search it (the default) "
         "or fix it at most that"),
    Case("unknown `--rank`", lambda t: search("--backbone", TWO, "--rank", "spearman"), "error: --rank spearman: expected probe, logme"),
    Case("an empty list of backbones", lambda t: search("--data", str(write_image_folder(t / "f", 2, 2)), *TINY, "--param", "backbone=[]"),
         "error: --param backbone []: expected backbone names, e.g. tf_efficientnet_lite0,tf_efficientnet_lite1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.mistake for c in CASES])
def test_one_line_error(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from tlengine._cli import main

    if "cuda" in case.mistake and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = case.setup(tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(case.message.format(tmp=tmp_path)), lines[0]


def test_every_case_documented() -> None:
    doc = (ROOT / "docs" / "errors.md").read_text()
    for case in CASES:
        assert case.message.format(tmp="DIR") in doc, f"docs/errors.md lacks: {case.message}"


def test_disk_full_while_writing_a_checkpoint(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing checkpoint write stops the search with one line; finished trials stay and the rerun resumes."""
    import json

    import safetensors.torch

    from tlengine._cli import main

    args = search("--data", str(tiny_folder), *TINY, "--out", str(tmp_path), "--study-name", "s")
    args[args.index("--trials") + 1] = "2"
    real_save = safetensors.torch.save_model
    calls = []

    def failing_second_save(model, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_model", failing_second_save)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path}/s/trials/1.safetensors: cannot write the checkpoint (No space left on device); finished trials are kept")
    assert not (tmp_path / "s" / "trials" / "1.safetensors").exists()  # no half-written checkpoint left behind
    monkeypatch.setattr(safetensors.torch, "save_model", real_save)
    assert main(args) == 0
    trials = json.loads((tmp_path / "s" / "summary.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete", "fail", "complete"]
    assert (tmp_path / "s" / "best.onnx").is_file()


def test_docs_rows_are_cases() -> None:
    """No stale rows: every message in the table comes from a case here or a test elsewhere."""
    doc = (ROOT / "docs" / "errors.md").read_text()
    documented = re.findall(r"`((?:error|warning): [^`]+)`", doc)
    known = {c.message.format(tmp="DIR") for c in CASES} | set(OTHER_TESTED)
    assert set(documented) <= known, set(documented) - known


#: Messages in docs/errors.md tested elsewhere (the file that tests each one).
OTHER_TESTED = {
    **{message: "test_distill.py" for _, message in __import__("test_distill").DISTILL_CASES},
    "error: --study-name c: the teacher was trained on other classes": "test_distill.py",
    "warning: skipped 3 image(s) of 29 (3 unreadable): DIR/train/class1/empty.png (UnidentifiedImageError": "test_images.py",
    "warning: plugin 'tlengine_broken' from package 'tlengine-broken' failed to load and is skipped: ImportError: needs libfoo": "test_plugins.py",
    "error: plugins 'heads' and 'clash-plugin' both register the head 'linear'; uninstall one of them or leave one out with TLENGINE_PLUGINS": "test_plugins.py",
    "error: --study-name x: this study was made with epochs=1, not 2; rerun with the same options or choose another --study-name": "test_search.py",
    "error: --study-name c: this study searched another space (lr differ); rerun with the same config or choose another --study-name": "test_space.py",
    "error: DIR/s/trials/1.safetensors: cannot write the checkpoint (No space left on device); finished trials are kept, free some space and run the same command again to resume": "test_errors.py",
    "warning: --backbone noweights: --weights none: no weights for offline here; left out of the search": "test_backbones.py",
    "warning: --param backbone: backbone lists one (timm:test_efficientnet): nothing to rank": "test_backbones.py",
    "warning: DIR/s/report.html: cannot write the report (File exists); the search's results are kept, draw it again with tlengine report --study-name s --storage sqlite:///DIR/s/study.db": "test_report.py",
}
