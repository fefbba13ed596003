"""tlengine: plugin-based AutoML transfer learning with timm, Optuna and ONNX.

The Python API mirrors the command line: :func:`search`, :func:`distill`, :func:`export`,
:func:`show` and :func:`report` take the options of ``tlengine search``, ``distill``,
``export``, ``show`` and ``report``; :func:`load` opens an exported model for prediction without PyTorch.

Heavy libraries (torch, timm, onnx, onnxruntime) are imported only by the
functions that need them, so ``import tlengine`` stays fast.
"""

from tlengine._api import distill, export, report, search, show
from tlengine._errors import UserError
from tlengine._export import ExportReport, Parity
from tlengine._predict import Model, Prediction, load
from tlengine._preprocess import Preprocess
from tlengine._record import StudyRecord, read_record
from tlengine._records import Backbone, Dataset, DatasetOptions, Head, ImageData, Optimizer, Split
from tlengine._report import Board, Report
from tlengine._search import SearchInterrupted, SearchResult
from tlengine._study import TrialRow
from tlengine.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Board",
    "Dataset",
    "DatasetOptions",
    "ExportReport",
    "Head",
    "ImageData",
    "Model",
    "Optimizer",
    "Parity",
    "Prediction",
    "Preprocess",
    "Report",
    "SearchInterrupted",
    "SearchResult",
    "Split",
    "StudyRecord",
    "TrialRow",
    "UserError",
    "__version__",
    "distill",
    "export",
    "hookimpl",
    "load",
    "read_record",
    "report",
    "search",
    "show",
]
