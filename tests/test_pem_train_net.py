"""train_net.py with a PEM config, run as users run it (a subprocess): a few iterations with two
CPU processes (PEM synchronises BatchNorm, which gloo runs through all_reduce) on the generated
toy panoptic dataset with the evaluation at the end, then ``--eval-only`` of the final weights in
one process, which must report the same metrics."""
import os
import unittest

from tests.test_train_net import TOY_OPTS, _printed_metrics, _tail, _TrainNetCase

PEM_TINY = "configs/quickstart/pem_STDC1_tiny_coco_panoptic.yaml"


class TestPEMTrainNet(_TrainNetCase):
    THREADS = "1"

    def start(self, args, log_name):
        # A later --config-file wins: the tiny PEM replaces the base class's Mask2Former config.
        return super().start(["--config-file", PEM_TINY] + list(args), log_name)

    def test_two_process_train_evaluate_and_eval_only(self):
        out_dir = os.path.join(self.tmp, "pem")
        schedule = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.IMS_PER_BATCH", "2",
                    "SEED", "3"]  # seeded, as the Mask2Former two-process test
        launch = ["--num-gpus", "2", "--dist-url", "auto"]
        out = self.run_train_net(launch + TOY_OPTS + schedule + ["OUTPUT_DIR", out_dir], "pem_train.log")
        self.assertIn("PEMTransformerDecoder", out)
        self.assertIn("World size: 2", out)
        self.assertIn("SyncBatchNorm layers synchronise through all_reduce", out)
        self.assertTrue(os.path.isfile(os.path.join(out_dir, "model_final.pth")))
        trained = _printed_metrics(out)
        for task, name in (("panoptic_seg", "PQ"), ("segm", "AP"), ("sem_seg", "mIoU")):
            self.assertIn(name, trained.get(task, {}), f"{task}/{name} not printed:\n{_tail(out)}")

        eval_dir = os.path.join(self.tmp, "pem_eval")
        weights = ["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]
        out = self.run_train_net(["--eval-only"] + TOY_OPTS + weights + ["OUTPUT_DIR", eval_dir], "pem_eval.log")
        evaluated = _printed_metrics(out)
        for task in ("panoptic_seg", "segm", "sem_seg"):
            for name, value in trained[task].items():
                if value == value:  # NaN for empty size ranges
                    self.assertAlmostEqual(evaluated[task][name], value, 2, (task, name))


if __name__ == "__main__":
    unittest.main()
