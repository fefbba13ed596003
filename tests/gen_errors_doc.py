"""Regenerate docs/errors.md from the cases in test_errors.py: python tests/gen_errors_doc.py"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import test_errors as t
COMPLETE_ENDINGS = ("class folders", "file", "found 1", "rows", "UTF-8", "integer", "auto", "none", "UnpicklingError)", "'tlengine search'", "folder", "classes", "header has 2", "(--confine-paths)", "regression targets", "text labels)", "remove the class", "t-shirt", "named after the class", "known: linear, mlp", "csv, demo, imagefolder", "adamw, sgd", "random, tpe", "median, none", "on this machine; use --device cpu or auto", "does not exist", "in DIR/v/train", "DIR/s.db; it has: none", "(did you mean 'trials'?)", "0.01 and 0.0001", "choose another --study-name", "docs/search-space.md", "several workers on the CPU", "its own image size", "gigabytes", "--no-cache", "pass --storage", "(Not a directory)", "raise --max-bad-images", "label/class/target/value/y)", "its header is image, label", "crop, randaugment", "center, whole", "search one backbone", "listed twice", "tpe or random", "at most that", "probe, logme", "tf_efficientnet_lite1")
sections = [("Data", 0, 18), ("Images", 18, 19), ("Names and options", 19, 44), ("Storage and studies", 44, 50), ("Weights and models", 50, 55), ("Environment", 55, 57), ("Several backbones", 57, 64)]
out = ["# Errors", "",
"Every user mistake ends in one line on stderr that names the file or option and says what",
"to do, with exit code 2 and no traceback (`tlengine --debug ...` shows it). Broken images",
"and broken plugins cost a warning, not the run. `DIR` stands for the folder in question;",
"`...` after a message means the line goes on with details (close matches, the first files,",
"the cause). `tests/test_errors.py` checks every row against the real command.", ""]
for title, a, b in sections:
    out += [f"## {title}", "", "| mistake | message |", "| --- | --- |"]
    for case in t.CASES[a:b]:
        msg = case.message.format(tmp="DIR")
        more = "" if msg.endswith(COMPLETE_ENDINGS) else " ..."
        out.append(f"| {case.mistake} | `{msg}`{more} |")
    if title == "Images":
        out.append("| a few unreadable images (empty, truncated, not images) | `warning: skipped 3 image(s) of 29 (3 unreadable): DIR/train/class1/empty.png (UnidentifiedImageError` ... (the run goes on without them; a CSV row whose file is missing counts here too, as `missing`) |")
        out.append("| unusual modes: palette with transparency, CMYK, 16-bit, RGBA, greyscale; upper-case extensions; unicode names | no message: read as RGB, transparency over white, 16 bits scaled to 8 (`tests/test_images.py`) |")
    if title == "Storage and studies":
        out.append("| an existing study made with other options (objective, data, task) | `error: --study-name x: this study was made with epochs=1, not 2; rerun with the same options or choose another --study-name` |")
        out.append("| an existing study that searched another space | `error: --study-name c: this study searched another space (lr differ); rerun with the same config or choose another --study-name` |")
    if title == "Several backbones":
        out.append("| weights missing for one of several backbones | `warning: --backbone noweights: --weights none: no weights for offline here; left out of the search` (the search goes on with the others; with none left, the error of the last one) |")
        out.append("| a list of one backbone | `warning: --param backbone: backbone lists one (timm:test_efficientnet): nothing to rank` (searched as `--backbone` alone) |")
    if title == "Environment":
        out.append("| the report cannot be written at the end of a search (here: a file where its folder goes) | `warning: DIR/s/report.html: cannot write the report (File exists); the search's results are kept, draw it again with tlengine report --study-name s --storage sqlite:///DIR/s/study.db` (exit code 0) |")
        out.append("| disk full while writing a checkpoint | `error: DIR/s/trials/1.safetensors: cannot write the checkpoint (No space left on device); finished trials are kept, free some space and run the same command again to resume` (the study stays consistent; the same command resumes) |")
    out.append("")
out += ["## Distillation", "", "| mistake | message |", "| --- | --- |"]
import test_distill
for mistake, (_, message) in zip(test_distill.MISTAKES, test_distill.DISTILL_CASES):
    out.append(f"| {mistake} | `{message}` ... |")
out += ["| a teacher trained on other classes than the data now has | `error: --study-name c: the teacher was trained on other classes` ... |", "",
"## Plugins", "", "| mistake | message |", "| --- | --- |",
"| a plugin that fails to import | `warning: plugin 'tlengine_broken' from package 'tlengine-broken' failed to load and is skipped: ImportError: needs libfoo` (the CLI keeps working) |",
"| two plugins register the same name | `error: plugins 'heads' and 'clash-plugin' both register the head 'linear'; uninstall one of them or leave one out with TLENGINE_PLUGINS` |", ""]
open(__import__("pathlib").Path(__file__).parents[1] / "docs" / "errors.md", "w").write("\n".join(out))
