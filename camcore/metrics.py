"""Evaluation of maps, one score per sample as NumPy: faithfulness to the model (:mod:`camcore.faithfulness`:
deletion and insertion AUC, ROAD, average drop, increase in confidence, win) and localisation against boxes
(:mod:`camcore.localisation`: the CAM paper's boxes and accuracy, IoU, the pointing games) and the model
randomisation sanity check (:mod:`camcore.sanity`). See
``docs/evaluation.md``."""
from __future__ import annotations

from .faithfulness import (average_drop, deletion_auc, deletion_curve, increase_in_confidence, insertion_auc, road,
                           road_curve, win)
from .localisation import box_iou, boxes_from_cam, energy_pointing_game, localisation_accuracy, pointing_game
from .sanity import randomization_check, spearman, ssim

__all__ = ["deletion_auc", "insertion_auc", "deletion_curve", "road", "road_curve", "average_drop", "increase_in_confidence", "win",
           "boxes_from_cam", "box_iou", "localisation_accuracy", "pointing_game", "energy_pointing_game",
           "randomization_check", "spearman", "ssim"]
