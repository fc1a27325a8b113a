"""Validation during training: classification on the held-out split, retrieval mAP on revisited datasets.

A :class:`Validator` holds what validation needs (config, model, held-out data, distributed context) and is
called with the current step; :class:`~tokenret.train.hooks.PeriodicValidation` is handed one and decides
when to call it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tokenret.data.augment import LabelledImageDataset, ValTransform
from tokenret.data.folders import LabelledImages
from tokenret.data.local_sets import LabelledSets, LocalSetDataset
from tokenret.train.build import TrainingModel, autocast, forward_features
from tokenret.train.config import TrainConfig
from tokenret.train.data import inputs_to_device
from tokenret.train.distributed import DistributedContext, all_reduce_sum, barrier, broadcast_object

__all__ = ["Validator"]

log = logging.getLogger(__name__)


class Validator:
    """Classification and retrieval validation of a training model (collective: call on every process).

    Args:
        cfg: the run's configuration (``cfg.val`` says what to compute).
        model: the model being trained (net + margin head); validated in eval mode, then put back in
            train mode.
        val: the held-out images or sets (None: no classification validation).
        ctx: distributed context; each process validates its share and the results are reduced.
        output_dir: where processes share retrieval descriptors when distributed.

    Example:
        >>> t = trainer                                                            # doctest: +SKIP
        >>> validator = Validator(t.cfg, t.model, t.data.val, t.ctx, t.output_dir)  # doctest: +SKIP
        >>> validator(step=100)                                                    # doctest: +SKIP
        {'val/loss': 2.1, 'val/top1': 0.61, 'val/top5': 0.83, 'val/top1_cosine': 0.6}
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: TrainingModel,
        val: LabelledImages | LabelledSets | None,
        ctx: DistributedContext,
        output_dir: str | Path,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.val = val
        self.ctx = ctx
        self.device = ctx.device
        self.output_dir = Path(output_dir)

    @property
    def metric_names(self) -> list[str]:
        """The metrics a call returns."""
        v = self.cfg.val
        names = []
        if v.classification and self.val is not None:
            names += ["val/loss", "val/top1", "val/top5", "val/top1_cosine"]
        for ds in v.retrieval_datasets:
            names += [f"{ds}/map_easy", f"{ds}/map_medium", f"{ds}/map_hard"]
        return names

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        """Validate now (at training step ``step``); every process gets the same metrics."""
        metrics: dict[str, float] = {}
        self.model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # Validation must not move the training RNG streams, or a resumed run would differ.
        with torch.random.fork_rng(devices=devices):
            try:
                if self.cfg.val.classification and self.val is not None:
                    metrics.update(self.classification())
                if self.cfg.val.retrieval_datasets:
                    metrics.update(self.retrieval(step))
            finally:
                self.model.train()
        return metrics

    def classification(self) -> dict[str, float]:
        """Margin loss, top-1 and top-5 of the margin logits, and top-1 of the plain cosine, on the held-out
        split (at most ``val.max_images`` of it, the same seeded choice each time)."""
        v, d = self.cfg.val, self.cfg.data
        images = self.val
        idx = np.arange(len(images))
        if v.max_images is not None and v.max_images < len(idx):
            idx = np.sort(
                np.random.default_rng(self.cfg.train.seed).choice(len(idx), v.max_images, replace=False)
            )
        idx = idx[self.ctx.rank :: self.ctx.world_size]
        if isinstance(images, LabelledSets):
            ds = LocalSetDataset(images.subset(idx), d.set_size, keep=None)
        else:
            ds = LabelledImageDataset(images.subset(idx), ValTransform(d.image_size, d.val_resize))
        loader = DataLoader(
            ds, batch_size=v.batch_size, num_workers=d.num_workers, pin_memory=self.device.type == "cuda"
        )
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, top1, top5, top1 cosine, n
        fmt = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        classifier = self.model.classifier
        k = min(5, classifier.num_classes)
        for x, y in loader:
            x = inputs_to_device(x, self.device, None, fmt)
            y = y.to(self.device)
            with autocast(self.device, self.cfg.train.amp):
                feats = forward_features(self.model.net, x)
            feats = feats.float()
            logits = classifier(feats, y)
            cos = classifier.cosine(feats)
            top = logits.topk(k, dim=1).indices
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (top[:, 0] == y).sum()
            sums[2] += (top == y[:, None]).any(1).sum()
            sums[3] += (cos.argmax(1) == y).sum()
            sums[4] += y.numel()
        all_reduce_sum(sums)
        n = max(float(sums[4]), 1.0)
        loss, top1, top5, top1c = (float(s) / n for s in sums[:4])
        return {"val/loss": loss, "val/top1": top1, "val/top5": top5, "val/top1_cosine": top1c}

    def retrieval(self, step: int) -> dict[str, float]:
        """Easy/Medium/Hard mAP of multi-scale descriptors on each of ``val.retrieval_datasets``."""
        from tokenret.data.revisited import RevisitedDataset
        from tokenret.evaluate import compute_revisited_map, ranks_from_scores
        from tokenret.extraction import ExtractionConfig, extract_descriptors

        v, r = self.cfg.val, self.cfg.train
        net = self.model.net
        amp = r.amp if (r.amp != "fp16" or self.device.type == "cuda") else "off"
        config = ExtractionConfig(
            max_size=v.retrieval_max_size,
            scales=tuple(v.retrieval_scales),
            batch_size=v.batch_size,
            num_workers=self.cfg.data.num_workers,
            amp=amp,
            channels_last=r.channels_last,
            device=str(self.device),
        )
        metrics: dict[str, float] = {}
        progress = r.progress and self.ctx.is_main
        for name in v.retrieval_datasets:
            ds = RevisitedDataset.from_root(v.retrieval_root, name)
            db_paths = [ds.image_path(i) for i in range(len(ds.imlist))]
            q_paths = [ds.query_path(i) for i in range(len(ds.qimlist))]
            boxes = [ds.query_box(i) if "bbx" in ds.gnd[i] else None for i in range(len(ds.qimlist))]
            cache = None
            if self.ctx.distributed:  # shards are shared through the output folder
                cache = self.output_dir / "val_descriptors" / f"step_{step:08d}" / name
            db = extract_descriptors(
                net,
                db_paths,
                None,
                config,
                None if cache is None else cache / "db",
                progress=progress,
                desc=f"{name} db",
            ).descriptors
            q = extract_descriptors(
                net,
                q_paths,
                boxes,
                config,
                None if cache is None else cache / "q",
                progress=progress,
                desc=f"{name} q",
            ).descriptors
            res = compute_revisited_map(ranks_from_scores(db @ q.T), ds.gnd)
            for proto in ("easy", "medium", "hard"):
                metrics[f"{name}/map_{proto}"] = float(res[proto]["map"])
        if self.ctx.distributed:
            barrier()
            if self.ctx.is_main:
                shutil.rmtree(self.output_dir / "val_descriptors", ignore_errors=True)
        return broadcast_object(metrics)
