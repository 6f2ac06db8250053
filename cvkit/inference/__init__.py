"""Prediction: Python-first ``predict`` and submissions (:mod:`.predict`), invertible TTA (:mod:`.tta`)."""
from cvkit.inference.predict import Prediction, iter_predict, list_images, predict, write_submission
from cvkit.inference.runs import RunModel, load_run, predict_run
from cvkit.inference.tta import TTATransform, create_tta, list_tta, register_tta, tta_predict

__all__ = ["Prediction", "RunModel", "TTATransform", "create_tta", "iter_predict", "list_images", "list_tta", "load_run", "predict",
           "predict_run", "register_tta", "tta_predict", "write_submission"]
