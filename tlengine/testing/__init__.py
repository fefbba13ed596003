"""Contract tests for tlengine plugins.

Every built-in plugin passes these; a third-party author subclasses them in their
own test suite (pytest collects classes named ``Test*``)::

    from tlengine.testing import BackboneContract

    class TestMyBackbone(BackboneContract):
        backbone = "mynet"

The classes need ``pytest`` and ``torch``.
"""

from tlengine.testing._contracts import BackboneContract, DatasetContract, HeadContract, OptimizerContract

__all__ = ["BackboneContract", "DatasetContract", "HeadContract", "OptimizerContract"]
