"""Prediction helpers: invertible test-time augmentation (more to come: CSV export, RLE)."""
from cvkit.inference.tta import TTATransform, create_tta, list_tta, register_tta, tta_predict

__all__ = ["TTATransform", "create_tta", "list_tta", "register_tta", "tta_predict"]
