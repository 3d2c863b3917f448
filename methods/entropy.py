"""Entropy maximisation (EM) and EM with asymmetric pseudo-labelling (EM_APL), Zhou et al. 2022."""
from __future__ import annotations

import torch

import losses
from methods.base import CoefficientMethod, Hyperparameter

ALPHA = Hyperparameter("alpha", float, "weight of the entropy term on unobserved labels (default per dataset)",
                       minimum=0.0)
WARMUP_EPOCH = Hyperparameter("warmup_epoch", int, "epochs of plain EM before pseudo-labels (EM_PL, EM_PL_ASL) "
                              "or APL (EM_APL) start, counted within the stage", default=0, minimum=0)


class EM(CoefficientMethod):
    name = "EM"
    description = "entropy maximisation on unobserved labels"
    hyperparameters = (ALPHA,)

    def label_coefficients(self, observed, pseudo, clean, epoch):
        return losses.em_coefficients(observed, self.hp.alpha)


# Zhou et al.'s settings (docs/DESIGN.md §5): batch, lr, alpha, beta, warm-up per dataset (a row, or
# NO_PROTOCOL).
APL_DATASET_DEFAULTS = {
    "pascal": dict(bsize=8, lr=1e-5, alpha=0.2, beta=0.02, warmup_epoch=5),
    "coco": dict(bsize=16, lr=1e-5, alpha=0.1, beta=0.9, warmup_epoch=5),
    "nuswide": dict(bsize=16, lr=1e-5, alpha=0.1, beta=0.2, warmup_epoch=4),
    "cub": dict(bsize=8, lr=1e-4, alpha=0.01, beta=0.4, warmup_epoch=3),
}


def apl_update(observed: torch.Tensor, scores: torch.Tensor, unobserved_at_start: torch.Tensor,
               neg_proportion: float, epochs_after_warmup: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APL (Zhou et al. 2022): per class c, the int(neg_proportion * U_c / epochs_after_warmup)
    lowest-scored entries whose observed label is still 0 become soft negatives -p.
    Returns the changes (rows, cols, values); ``observed`` is not modified."""
    per_class = (neg_proportion * unobserved_at_start.double() / epochs_after_warmup).floor().long()
    rows, cols = [], []
    for c in range(observed.shape[1]):
        candidates = (observed[:, c] == 0).nonzero().squeeze(1)
        take = min(int(per_class[c]), len(candidates))
        if take:
            rows.append(candidates[torch.argsort(scores[candidates, c], stable=True)[:take]])
            cols.append(torch.full((take,), c, dtype=torch.long))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    rows, cols = torch.cat(rows), torch.cat(cols)
    return rows, cols, -scores[rows, cols]


class EMAPL(CoefficientMethod):
    name = "EM_APL"
    description = "EM plus asymmetric pseudo-labelling: soft negatives after each epoch past the warm-up"
    hyperparameters = (
        ALPHA,
        Hyperparameter("beta", float, "EM_APL weight of the soft negative labels (default per dataset)", minimum=0.0),
        WARMUP_EPOCH,
        Hyperparameter("neg_proportion", float, "EM_APL share of unobserved labels turned into soft negatives",
                       default=0.9, minimum=0.0, maximum=1.0),
    )
    dataset_defaults = APL_DATASET_DEFAULTS
    uses_train_predictions = True

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        stage_epochs = min(config["epochs"], config["head_epochs"]) if config["train_mode"] == "linear_init" \
            else config["epochs"]
        if config["warmup_epoch"] >= stage_epochs:
            raise ValueError(f"EM_APL needs --warmup-epoch ({config['warmup_epoch']}) below the epochs of each "
                             f"training stage ({stage_epochs})")

    def label_coefficients(self, observed, pseudo, clean, epoch):
        return losses.em_apl_coefficients(observed, self.hp.alpha, self.hp.beta)

    def end_epoch(self, epoch, train_predictions):
        if epoch < self.hp.warmup_epoch:
            return
        labels = self.labels
        changes = apl_update(labels.observed, train_predictions(), labels.unobserved_at_start(),
                             self.hp.neg_proportion, self.stage_epochs - self.hp.warmup_epoch)
        labels.update_observed(*changes)
