#!/usr/bin/env python
"""Reports every problem of a dataset up front, and what training does about each.

    tools/check_dataset.py trees_train                  # a registered dataset
    tools/check_dataset.py --coco ann.json:images/      # a COCO-format file

Exit status 1 when a problem would stop training (a class id outside the model's classes).
"""

import argparse
import sys

try:
    # First: the package silences the torch.jit.script warnings detectron2 causes at import,
    # and it registers the builtin datasets.
    import deformable_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"check_dataset.py: {error}. Run `make setup` (or use .venv/bin/python).")
try:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from deformable_detr.data.user_coco import parse_coco_spec
    from deformable_detr.data.validation import find_dataset_problems
except ImportError as error:
    sys.exit(f"check_dataset.py: {error}. Run `make setup` (or use .venv/bin/python).")


def _register_coco(specs):
    """Registers each "ann.json:image_dir" as ``check_coco_<i>``; returns the names."""
    names = []
    for i, spec in enumerate(specs):
        json_file, image_root = parse_coco_spec(spec)
        name = f"check_coco_{i}"
        register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="registered dataset names, e.g. trees_train")
    parser.add_argument(
        "--coco", action="append", default=[], metavar="ANN.json:IMAGE_DIR",
        help="a COCO-format dataset to check (repeatable)",
    )
    parser.add_argument("--num-classes", type=int, help="default: classes in the dataset metadata")
    parser.add_argument("--no-read", action="store_true", help="do not decode the images")
    args = parser.parse_args(argv)
    if not args.names and not args.coco:
        parser.error("give dataset names or --coco ANN.json:IMAGE_DIR")

    fatal = False
    for name in args.names + _register_coco(args.coco):
        if name not in DatasetCatalog.list():
            registered = ", ".join(DatasetCatalog.list())
            sys.exit(f"Dataset {name!r} is not registered; registered: {registered}")
        records = DatasetCatalog.get(name)
        thing_classes = MetadataCatalog.get(name).get("thing_classes", [])
        num_classes = args.num_classes or len(thing_classes) or None
        problems = find_dataset_problems(records, num_classes, read_images=not args.no_read)
        print(f"{name}: {len(records)} images, {len(problems)} problems")
        for problem in problems:
            print(f"  {problem}")
        fatal |= any(problem.action == "error" for problem in problems)
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
