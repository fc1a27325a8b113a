"""The metric sink: the one place the training loop and its hooks report metrics, and writers read them.

The loop reports training loss, top-1, learning rate and throughput; :class:`~tokenret.train.hooks.
PeriodicValidation` reports validation metrics; :class:`~tokenret.train.hooks.MetricsLogger` subscribes a
writer that puts every record in ``log.jsonl``, TensorBoard and the progress bar. No reporter knows which
writers exist, and a writer needs no reporter to find it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MetricSink", "RECORD_FIELDS"]

#: Fields of every record besides its values.
RECORD_FIELDS = ("kind", "step", "epoch", "time")

#: Receives every record put into a sink.
MetricWriter = Callable[[dict[str, Any]], None]


class MetricSink:
    """Metric records of a run, handed to the subscribed writers as they arrive.

    A record is a flat dict: ``kind`` (``"train"``, ``"val"``), ``step``, ``epoch``, the metric values, and
    ``time``. The sink keeps the latest values of each kind (a checkpoint saves the latest validation).

    Example:
        >>> sink = MetricSink()
        >>> sink.add_writer(print)
        >>> sink.put({"kind": "val", "step": 4, "epoch": 2.0, "val/top1": 0.5, "time": 0.0})
        {'kind': 'val', 'step': 4, 'epoch': 2.0, 'val/top1': 0.5, 'time': 0.0}
        >>> sink.latest("val")
        {'val/top1': 0.5}
    """

    def __init__(self) -> None:
        self._writers: list[MetricWriter] = []
        self._latest: dict[str, dict[str, Any]] = {}

    def put(self, record: dict[str, Any]) -> None:
        """Hand ``record`` to every writer, in the order they subscribed, and keep its values."""
        self._latest[record["kind"]] = {k: v for k, v in record.items() if k not in RECORD_FIELDS}
        for writer in list(self._writers):
            writer(record)

    def latest(self, kind: str) -> dict[str, Any]:
        """The values of the last record of ``kind`` (empty if none yet)."""
        return dict(self._latest.get(kind, {}))

    def restore_latest(self, kind: str, values: Mapping[str, Any]) -> None:
        """Set the latest values of ``kind`` without a record (a resumed run's last validation)."""
        self._latest[kind] = dict(values)

    def add_writer(self, writer: MetricWriter) -> None:
        self._writers.append(writer)

    def remove_writer(self, writer: MetricWriter) -> None:
        if writer in self._writers:
            self._writers.remove(writer)
