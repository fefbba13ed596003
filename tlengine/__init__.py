"""tlengine: plugin-based AutoML transfer learning with timm, Optuna and ONNX.

Heavy libraries (torch, timm, onnx, onnxruntime) are imported only by the
functions that need them, so ``import tlengine`` stays fast.
"""

from tlengine._errors import UserError
from tlengine._predict import Model, Prediction, load
from tlengine._preprocess import Preprocess
from tlengine._records import Backbone, Dataset, DatasetOptions, Head, ImageData, Optimizer, Split
from tlengine.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Dataset",
    "DatasetOptions",
    "Head",
    "ImageData",
    "Model",
    "Optimizer",
    "Prediction",
    "Preprocess",
    "Split",
    "UserError",
    "__version__",
    "hookimpl",
    "load",
]
