"""PTQ algorithms (issue 25): one file per algorithm, each registered by `@register_algorithm` in its own file and
imported here once. The pipeline, the protocol and the statistics collector are in base.py."""

from . import adaround, bias_correction, cle  # noqa: F401  (each registers itself)
from .base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmContext,
    AlgorithmOptions,
    AlgorithmRecord,
    AlgorithmStep,
    ChannelStats,
    PipelineResult,
    StatisticRequest,
    Statistics,
    register_algorithm,
)

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmContext", "AlgorithmOptions", "AlgorithmRecord", "AlgorithmStep",
           "ChannelStats", "PipelineResult", "StatisticRequest", "Statistics", "register_algorithm"]
