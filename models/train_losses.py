"""Losses and validation metrics of the inspection network's training.

The anomaly heads' bootstrap-weighted cross-entropy and the roughness head's Gaussian
negative log-likelihood (:func:`losses`), and the validation loss, AUROC and roughness error
that :func:`models.train.train_model` selects epochs by (:func:`evaluate`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .network import InspectionNet
from .train_batches import _device_of

#: roughness targets and predictions are compared in units of this many nm
SA_UNIT_NM = 5.0

#: weight of the anomaly pixels in the cross-entropy (defect cells are a minority of a batch)
POS_WEIGHT = 3.0
#: weight of the roughness loss against the anomaly loss: its Gaussian NLL is unbounded
#: (``exp(-logvar)``), and at weight 1 its gradients took over the shared trunk (gradient norm
#: clipped on half the steps) and the anomaly heads stayed near a constant
ROUGHNESS_WEIGHT = 0.1


def losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
           weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Anomaly (cross-entropy per head, bootstrap-weighted) and roughness (Gaussian NLL) losses.

    Plain weighted cross-entropy, not focal loss: focal loss down-weights the confident cells
    and left the heads under-confident (obvious blobs scored 0.4, the surface 0.2), which
    no threshold separates well.
    """
    logits = out["anomaly_logits"]  # (N, K, h, w)
    target = batch["target"].expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(
        logits, target, reduction="none", pos_weight=logits.new_tensor(POS_WEIGHT)
    ).mean(dim=(2, 3))  # (N, K)
    if weights is not None:
        ce = ce * weights
    anomaly = ce.mean()
    known = batch["sa_known"]
    if known.sum() > 0:
        mu = out["roughness"] / SA_UNIT_NM
        y = batch["sa"] / SA_UNIT_NM
        logvar = out["roughness_logvar"]
        nll = 0.5 * (logvar + (y - mu) ** 2 * torch.exp(-logvar))
        l1 = (y - mu).abs()
        rough = ((nll + l1) * known).sum() / known.sum()
    else:
        rough = logits.sum() * 0.0
    return {"anomaly": anomaly, "roughness": rough,
            "total": anomaly + ROUGHNESS_WEIGHT * rough}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; NaN if one class."""
    from scipy.stats import rankdata

    labels = labels.astype(bool).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(net: InspectionNet, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Validation loss, stride-level AUROC of synthetic anomalies and roughness MAE (nm)."""
    net.eval()
    device = _device_of(net)
    total, scores, labels, err, n_known = 0.0, [], [], 0.0, 0.0
    with torch.inference_mode():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            out = net(b["x"])
            total += float(losses(out, b)["total"])
            scores.append(torch.sigmoid(out["anomaly_logits"]).mean(1).cpu().numpy().ravel())
            labels.append(b["target"].cpu().numpy().ravel())
            k = b["sa_known"]
            err += float(((out["roughness"] - b["sa"]).abs() * k).sum())
            n_known += float(k.sum())
    net.train()
    return {
        "val_loss": total / max(len(batches), 1),
        "val_auroc": auroc(np.concatenate(scores), np.concatenate(labels) > 0.5),
        "val_sa_mae_nm": err / n_known if n_known else float("nan"),
    }
