"""Built-in group aggregators: ``mode`` (majority vote of the images' predicted labels) and
``mean`` (mean of the images' node probabilities, then decoded); docs/aggregation.md."""

from __future__ import annotations

from collections.abc import Callable

from hiercls.aggregate import MeanAggregator, ModeAggregator
from hiercls.hookspecs import hookimpl


@hookimpl
def register_aggregators(register: Callable[..., None]) -> None:
    register("mode", ModeAggregator)
    register("mean", MeanAggregator)
