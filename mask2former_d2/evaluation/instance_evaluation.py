"""COCO-style instance evaluation for panoptic datasets whose thing ids are not 0..N-1."""
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation import COCOEvaluator

__all__ = ["InstanceSegEvaluator"]


class InstanceSegEvaluator(COCOEvaluator):
    """:class:`COCOEvaluator` for models whose class ids are contiguous over *all* panoptic
    classes (e.g. ADE20K panoptic, where the 100 thing classes sit among 150 classes).

    Detectron2's evaluator requires thing ids ``0..N-1``. Predictions are re-indexed here by the
    rank of their class among the thing classes, predictions of stuff classes are dropped, and
    the evaluator sees the matching ``dataset id -> rank`` map; reported names and numbers are
    those of the dataset's categories.
    """

    def __init__(self, dataset_name: str, *args, **kwargs) -> None:
        super().__init__(dataset_name, *args, **kwargs)
        meta = MetadataCatalog.get(dataset_name)
        thing_map = meta.thing_dataset_id_to_contiguous_id
        self._rank = {c: r for r, c in enumerate(sorted(thing_map.values()))}
        fields = dict(meta.as_dict())
        fields["thing_dataset_id_to_contiguous_id"] = {d: self._rank[c] for d, c in thing_map.items()}
        # Per-category tables need one name per thing, in rank order. Some panoptic metadata
        # (e.g. Detectron2's "coco_panoptic_standard") lists every class in thing_classes,
        # indexed by contiguous id; take the things' names from it.
        names = list(fields.get("thing_classes", []))
        if len(names) != len(self._rank):
            everything = list(fields.get("stuff_classes", [])) or names
            if len(everything) > max(self._rank):
                fields["thing_classes"] = [everything[c] for c in sorted(self._rank)]
        self._metadata = Metadata(**fields)

    def process(self, inputs, outputs):
        remapped = []
        for out in outputs:
            if "instances" in out:
                inst = out["instances"].to(self._cpu_device)
                classes = inst.pred_classes.tolist()
                keep = [c in self._rank for c in classes]
                inst = inst[keep] if not all(keep) else inst
                inst.pred_classes = inst.pred_classes.new_tensor(
                    [self._rank[c] for c in inst.pred_classes.tolist()]
                )
                out = {**out, "instances": inst}
            remapped.append(out)
        super().process(inputs, remapped)
