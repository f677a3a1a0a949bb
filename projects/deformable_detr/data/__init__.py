from .trees import prepare_trees, register_trees
from .user_coco import register_user_coco

__all__ = ["prepare_trees", "register_trees", "register_user_coco"]
