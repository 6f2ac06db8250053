"""Stand-alone tools around training: the LR range test and the outlier search."""
from cvkit.tools.lr_find import LRFindResult, lr_find
from cvkit.tools.outliers import contact_sheet, extract_features, rank_outliers, score_outliers

__all__ = ["LRFindResult", "contact_sheet", "extract_features", "lr_find", "rank_outliers", "score_outliers"]
