"""Local features + an aggregator as one image model: what lets a folder index use HOW/DELF with Token's
aggregator or VLAD (``tokenret index PHOTOS --out INDEX --local how_r101 --aggregator token ...``).

:class:`LocalAggregateModel` maps a batch of images (normalised with ImageNet's mean/std, as every tokenret
loader gives them) to L2-normalised global descriptors: each image is re-normalised for the local network,
its descriptor set is extracted over the network's own pyramid (top-N strongest), and the set is aggregated
by a trained ``token_set_*`` head or by VLAD over a codebook. Its descriptors are those of
``tokenret evaluate --local ... --aggregator token|vlad``. It saves itself into one file (both networks,
their settings and the codebook) that :meth:`LocalAggregateModel.load` rebuilds.

ASMK is not a global vector: it needs its own inverted file (:class:`tokenret.aggregate.AsmkIndex`).

Example:
    >>> local = create_local_model("how_r101", checkpoint="R101-HOW.pth")                   # doctest: +SKIP
    >>> head = tokenret.create_model("token_set_how_r101", checkpoint="set_r101.pth")        # doctest: +SKIP
    >>> model = LocalAggregateModel(local, head)                                             # doctest: +SKIP
    >>> model(images).shape                                                                  # doctest: +SKIP
    torch.Size([2, 1024])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenret.aggregate.codebook import Codebook
from tokenret.aggregate.vlad import vlad
from tokenret.data.images import IMAGENET_MEAN, IMAGENET_STD
from tokenret.extraction.local_sets import normalisation
from tokenret.models import checkpoints as ck

FORMAT = "tokenret-local-aggregate-v1"
#: ``model_name`` prefix that tells indexes to rebuild with :meth:`LocalAggregateModel.load`.
NAME_PREFIX = "local:"


class LocalAggregateModel(nn.Module):
    """Images -> descriptor sets of a local network -> one global vector (Token head on the set, or VLAD).

    Args:
        local: a local-feature network (HOW, DELF) with ``extract_local``.
        aggregator: a set model (``token_set_*``, maps (B, N, C) + mask to unit vectors) or a
            :class:`Codebook` for VLAD.
        scales, topk: the local network's pyramid and features kept (default: its own runtime values).
        vlad_power, vlad_intra_normalize: VLAD's normalisations (as ``--vlad-power``; intra-norm on).
    """

    def __init__(
        self,
        local: nn.Module,
        aggregator: nn.Module | Codebook,
        *,
        scales: Sequence[float] | None = None,
        topk: int | None = None,
        vlad_power: float | None = None,
        vlad_intra_normalize: bool = True,
    ) -> None:
        super().__init__()
        self.local = local
        self.scales = tuple(float(s) for s in (scales or local.runtime["scales"]))
        self.topk = int(topk or local.runtime["features_num"])
        if isinstance(aggregator, Codebook):
            if aggregator.dim != local.output_dim:
                raise ValueError(
                    f"the codebook is {aggregator.dim}-d, {local.model_name} gives {local.output_dim}"
                )
            self.kind = "vlad"
            self.head = None
            self.register_buffer("centroids", torch.from_numpy(aggregator.centroids.copy()))
            self.vlad_power, self.vlad_intra_normalize = vlad_power, bool(vlad_intra_normalize)
            self.descriptor_dim = aggregator.size * aggregator.dim
        else:
            if getattr(aggregator, "input_dim", local.output_dim) != local.output_dim:
                raise ValueError(
                    f"{aggregator.model_name} takes {aggregator.input_dim}-d descriptors, "
                    f"{local.model_name} gives {local.output_dim}-d"
                )
            self.kind = "token"
            self.head = aggregator
            self.centroids = None
            self.vlad_power, self.vlad_intra_normalize = None, True
            self.descriptor_dim = int(aggregator.descriptor_dim)
        mean, std = normalisation(local)
        # images arrive normalised with ImageNet's statistics; the local network may want others
        self._renorm = None
        if (tuple(mean), tuple(std)) != (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)):
            self._renorm = (
                torch.tensor(IMAGENET_STD).reshape(3, 1, 1) / torch.tensor(std).reshape(3, 1, 1),
                (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)).reshape(3, 1, 1)
                / torch.tensor(std).reshape(3, 1, 1),
            )
        self.model_name = f"{NAME_PREFIX}{local.model_name}+{self.kind}"
        self.model_kwargs = self._settings()

    def _settings(self) -> dict[str, Any]:
        return {
            "local": self.local.model_name,
            "local_kwargs": dict(self.local.model_kwargs),
            "local_runtime": dict(self.local.runtime),
            "aggregator": self.kind,
            "head": getattr(self.head, "model_name", None),
            "head_kwargs": dict(getattr(self.head, "model_kwargs", {}) or {}),
            "codebook_size": None if self.centroids is None else int(self.centroids.shape[0]),
            "scales": list(self.scales),
            "topk": self.topk,
            "vlad_power": self.vlad_power,
            "vlad_intra_normalize": self.vlad_intra_normalize,
        }

    def describe_set(self, descriptors: Tensor) -> Tensor:
        """One set (N, C) -> its global vector (D,), L2-normalised."""
        if self.kind == "vlad":
            v = vlad(
                descriptors.float().cpu().numpy(),
                Codebook(self.centroids.float().cpu().numpy()),  # the buffer: what load_state_dict set
                power=self.vlad_power,
                intra_normalize=self.vlad_intra_normalize,
            )
            return torch.from_numpy(v).to(descriptors.device)
        if len(descriptors) == 0:
            return descriptors.new_zeros(self.descriptor_dim)
        return self.head(descriptors[None].float())[0]

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, D) unit descriptors."""
        out = []
        for image in images:
            if self._renorm is not None:
                scale, shift = (t.to(image) for t in self._renorm)
                image = image * scale + shift
            sets = self.local.extract_local(image.contiguous(), self.scales, self.topk)
            out.append(self.describe_set(sets["descriptors"].to(images.device)))
        return F.normalize(torch.stack(out).float(), dim=-1)

    # -- one file ----------------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Both networks, their settings and the codebook in one file (read back by :meth:`load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = {"format": FORMAT, "settings": self._settings(), "state_dict": self.state_dict()}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LocalAggregateModel:
        """Rebuild from :meth:`save_checkpoint`'s file (read with ``weights_only=True``)."""
        from tokenret.models.local import build_local_model
        from tokenret.models.registry import create_model

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ck.CheckpointError(f"{path} is not a {FORMAT} file (saved by LocalAggregateModel)")
        s, state = obj["settings"], obj["state_dict"]
        local = build_local_model(s["local"], **s["local_kwargs"])
        local.runtime.update(s["local_runtime"])
        if s["aggregator"] == "vlad":
            aggregator = Codebook(state["centroids"].numpy())
        else:
            aggregator = create_model(s["head"], **s["head_kwargs"])
        model = cls(
            local,
            aggregator,
            scales=s["scales"],
            topk=s["topk"],
            vlad_power=s["vlad_power"],
            vlad_intra_normalize=s["vlad_intra_normalize"],
        )
        report = ck.compare_keys(model, state)
        if not report.ok:
            raise ck.CheckpointError(f"{path} does not fit {model.model_name}: {ck.format_report(report)}")
        model.load_state_dict(state)
        return model.eval()


__all__ = ["NAME_PREFIX", "LocalAggregateModel"]
