"""The model zoo: the table against the repository, and ``zoo://`` names downloaded from a local
HTTP server on 127.0.0.1 (never the outside network) through Detectron2's checkpointer."""
import contextlib
import hashlib
import http.server
import io
import os
import shutil
import socket
import tempfile
import threading
import unittest
from dataclasses import replace
from functools import partial
from unittest import mock

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from mask2former_d2 import model_zoo
from mask2former_d2.checkpoint import MaskFormerCheckpointer
from tests.common import ROOT, save_checkpoint, tiny_cfg


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keeps the test output clean
        pass


class _LocalServer:
    """Serves ``root`` on 127.0.0.1 at a free port in a thread; records the GET paths."""

    def __init__(self, root: str) -> None:
        handler = type("Handler", (_CountingHandler,), {"requests": []})
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=root))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/maskformer/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


class TestTable(unittest.TestCase):
    def test_names_files_and_configs(self):
        ckpts = model_zoo.list_checkpoints()
        names = [c.name for c in ckpts]
        self.assertEqual(len(names), len(set(names)))
        for c in ckpts:
            with self.subTest(name=c.name):
                # The published file names carry their md5 prefix; the path ends with the file.
                self.assertEqual(c.file, f"model_final_{c.md5_prefix}.pkl")
                self.assertTrue(c.path.endswith("/" + c.file))
                if c.config is not None:
                    self.assertTrue(os.path.isfile(os.path.join(ROOT, c.config)), c.config)
                    # The checkpoint's folder is named after its config.
                    stem = os.path.splitext(os.path.basename(c.config))[0]
                    self.assertEqual(c.path.split("/")[-2].replace("maskformer_", "maskformer2_"),
                                     stem.replace("maskformer_", "maskformer2_"))
        self.assertEqual(model_zoo.get_config_file("coco/panoptic/R50"),
                         os.path.join(ROOT, "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"))

    def test_unknown_name(self):
        with self.assertRaisesRegex(KeyError, "coco/panoptic/swin_tiny"):
            model_zoo.get("coco/panoptic/swin_tiyn")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(model_zoo.main(["info", "coco/panoptic/swin_tiyn"]), 2)
        self.assertEqual(len(err.getvalue().splitlines()), 1)

    def test_info_command(self):
        out = io.StringIO()
        cache = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cache)
        with contextlib.redirect_stdout(out), mock.patch.dict(os.environ, {"FVCORE_CACHE": cache}):
            self.assertEqual(model_zoo.main(["info", "ytvis_2019/video/swin_tiny"]), 0)
        lines = dict(line.split(": ", 1) for line in out.getvalue().splitlines())
        self.assertEqual(lines["config"].strip(),
                         "configs/youtubevis_2019/swin/video_maskformer2_swin_tiny_bs16_8ep.yaml")
        self.assertEqual(
            lines["url"].strip(),
            "https://dl.fbaipublicfiles.com/maskformer/video_mask2former/ytvis_2019/"
            "video_maskformer2_swin_tiny_bs16_8ep/model_final_26fffe.pkl",
        )
        self.assertEqual(
            lines["cached at"].strip(),
            f"{cache}/maskformer/video_mask2former/ytvis_2019/video_maskformer2_swin_tiny_bs16_8ep/"
            "model_final_26fffe.pkl",
        )


class TestDownload(unittest.TestCase):
    """A tiny model's weights, saved in the model-zoo layout, served under a registered name."""

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.cfg = tiny_cfg()
        cls.model = build_model(cls.cfg)
        cls.tmp = tempfile.mkdtemp()
        cls.www = os.path.join(cls.tmp, "www")
        folder = os.path.join(cls.www, "maskformer", "test", "tiny")
        os.makedirs(folder)
        src = save_checkpoint(cls.model, cls.tmp, "pkl")
        cls.md5 = _md5(src)
        cls.file = f"model_final_{cls.md5[:6]}.pkl"
        shutil.copy(src, os.path.join(folder, cls.file))
        # The registered names are removed again when the class is done (the table is global).
        cls.table = mock.patch.dict(model_zoo._table()["by_name"])
        cls.table.start()
        base = model_zoo.get("coco/panoptic/R50")
        for name, prefix in [("test/tiny/R18", cls.md5[:6]), ("test/tiny/wrong_md5", "000000")]:
            model_zoo.register(replace(base, name=name, config=None, file=cls.file,
                                       path=f"test/tiny/{cls.file}", md5_prefix=prefix))

    @classmethod
    def tearDownClass(cls):
        cls.table.stop()
        shutil.rmtree(cls.tmp)

    def setUp(self):
        self.server = _LocalServer(self.www)
        self.cache = tempfile.mkdtemp()
        env = mock.patch.dict(os.environ, {model_zoo.URL_ENV: self.server.url, "FVCORE_CACHE": self.cache})
        env.start()
        self.addCleanup(env.stop)
        self.addCleanup(shutil.rmtree, self.cache)
        self.addCleanup(self.server.close)

    def assert_same_weights(self, model):
        ours, theirs = model.state_dict(), self.model.state_dict()
        self.assertEqual(set(ours), set(theirs))
        for k in ours:
            self.assertTrue(torch.equal(ours[k], theirs[k]), k)

    def test_weights_by_name_downloaded_once(self):
        # Through Detectron2's checkpointer and this project's (as train_net.py and Predictor load).
        for checkpointer in (DetectionCheckpointer, MaskFormerCheckpointer):
            torch.manual_seed(1)
            fresh = build_model(self.cfg)
            checkpointer(fresh).load("zoo://test/tiny/R18")
            self.assert_same_weights(fresh)
        self.assertEqual(self.server.handler.requests, [f"/maskformer/test/tiny/{self.file}"])
        local = model_zoo.get_local_path("test/tiny/R18")
        self.assertTrue(local.startswith(self.cache))
        self.assertEqual(_md5(local), self.md5)

    def test_wrong_file_rejected_and_removed(self):
        with self.assertRaisesRegex(ValueError, "does not start with 000000"):
            model_zoo.download("zoo://test/tiny/wrong_md5")
        self.assertFalse(os.path.exists(model_zoo.get_local_path("test/tiny/wrong_md5")))

    def test_offline_names_url_and_local_path(self):
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{s.getsockname()[1]}/maskformer/"
        with mock.patch.dict(os.environ, {model_zoo.URL_ENV: closed}):
            local = model_zoo.get_local_path("test/tiny/R18")
            with self.assertRaises(OSError) as ctx:
                model_zoo.download("test/tiny/R18")
            msg = str(ctx.exception)
            self.assertNotIn("\n", msg)
            self.assertIn(closed + f"test/tiny/{self.file}", msg)
            self.assertIn(local, msg)
            # Put by hand where the message says: used without any request.
            os.makedirs(os.path.dirname(local), exist_ok=True)
            shutil.copy(os.path.join(self.www, "maskformer", "test", "tiny", self.file), local)
            torch.manual_seed(1)
            fresh = build_model(self.cfg)
            DetectionCheckpointer(fresh).load("zoo://test/tiny/R18")
        self.assert_same_weights(fresh)
        self.assertEqual(self.server.handler.requests, [])


if __name__ == "__main__":
    unittest.main()
