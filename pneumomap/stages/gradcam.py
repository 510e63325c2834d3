"""Grad-CAM and Grad-CAM++ on a classifier's last feature map: the baseline explainer.

Same interface as a mapper: ``GradCAM(classifier).predict(x, features=None) -> (B, 1, h, w)``
in [0, 1] at the input size, batched on the device, no numpy round trip. The gradient of
the class score with respect to the last feature map only runs through the head (GeM +
linear), so the encoder runs without gradients and a given ``features = classifier.encode(x)``
is reused for member 0 (one encoder pass for classifier, mapper and Grad-CAM alike).

Ensembles: the mean of the members' maps; with the classifier's ``flip_tta`` the map of
the flipped image is flipped back and averaged. Each map is min-max scaled per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumomap.stages.classifier import ScoreStage
from pneumomap.stages.encoders import EncoderHead

METHODS = ("gradcam", "gradcam++")


class GradCAM(nn.Module):
    """``method``: 'gradcam' or 'gradcam++'; ``class_index``: the explained output (default: the
    only logit of a binary head, the predicted class of a multi-class head)."""

    def __init__(self, classifier: ScoreStage, method: str = "gradcam", class_index: int | None = None) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {list(METHODS)}")
        self.classifier = classifier
        self.method = method
        self.class_index = class_index

    @property
    def input_size(self) -> tuple[int, int]:
        return self.classifier.input_size

    def predict(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Maps (B, 1, h, w) in [0, 1] at the size of ``x``; ``features`` = ``classifier.encode(x)``, reused."""
        cams = []
        for i, member in enumerate(self.classifier.members):
            cams.append(self._member_cam(member, x, features if i == 0 else None))
            if self.classifier.config.flip_tta:
                cams.append(torch.flip(self._member_cam(member, torch.flip(x, dims=(-1,))), dims=(-1,)))
        cam = cams[0] if len(cams) == 1 else torch.stack(cams).mean(0)
        return _minmax(cam)

    def _member_cam(self, member: EncoderHead, x: torch.Tensor,
                    features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Un-normalized map (B, 1, h, w) of one member."""
        if features is None:
            with torch.no_grad():
                features = member.encoder(x)
        with torch.enable_grad():
            activations = features[-1].detach().float().requires_grad_(True)
            logits = member.head_logits(activations)
            index = self.class_index
            if index is None:
                score = logits[:, 0] if logits.shape[1] == 1 else logits.gather(1, logits.argmax(1, keepdim=True))[:, 0]
            else:
                score = logits[:, index]
            (grads,) = torch.autograd.grad(score.sum(), activations)  # images are independent: one backward
        activations = activations.detach()
        if self.method == "gradcam":
            weights = grads.mean(dim=(2, 3), keepdim=True)
        else:  # Grad-CAM++ (Chattopadhay et al. 2018)
            g2 = grads.pow(2)
            denominator = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g2 * grads
            alpha = torch.where(grads != 0, g2 / (denominator + 1e-7), torch.zeros_like(g2))
            weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1]; a constant map becomes 0."""
    low = cam.amin(dim=(2, 3), keepdim=True)
    span = cam.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp(min=1e-12), torch.zeros_like(cam)).clamp(0, 1)
