"""The CLI maps onto the Python API and reports user errors without a traceback."""
from __future__ import annotations

import json

import numpy as np

from sslfeatures.cli import main


def test_methods_lists_all(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("simclr", "mocov2", "byol", "dino", "mae"):
        assert name in out


def test_pretrain_embed_knn_export(tiny_images, labelled_images, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "simclr", "--data", str(tiny_images), "--backbone", "resnet18",
                 "--stem", "small_s2", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
                 "--out", str(run), "--set", "proj_hidden_dim=64", "progress=false",
                 "backbone_kwargs={channels: [16, 32, 64, 128]}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    epochs = json.loads((run / "train_config.json").read_text())["epochs"]
    assert epochs == 1 and isinstance(epochs, int)  # "--epochs 1" is stored as a whole number
    assert main(["embed", "--model", str(run), "--data", str(tiny_images), "--out", str(tmp_path / "f.npy")]) == 0
    assert np.load(tmp_path / "f.npy").shape == (48, 128)
    assert main(["embed", "--model", str(run), "--data", str(tiny_images), "--out", str(tmp_path / "g.npy"),
                 "--last-blocks", "2"]) == 0  # stage 3 (64) + stage 4 (128)
    assert np.load(tmp_path / "g.npy").shape == (48, 192)
    assert main(["embed", "--model", str(run), "--data", str(tiny_images), "--out", str(tmp_path / "h.npy"),
                 "--image-size", "40", "--pooling", "gem"]) == 0
    from sslfeatures import Encoder

    enc = Encoder.from_pretrained(run, image_size=40)
    assert np.allclose(np.load(tmp_path / "h.npy"), enc.embed_folder(tiny_images, pooling="gem")[1], atol=1e-5)
    capsys.readouterr()
    train, test = labelled_images
    assert main(["knn", "--model", str(run), "--train", str(train), "--test", str(test)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["top1"] <= 1
    assert main(["knn", "--model", "raw", "--train", str(train), "--test", str(test)]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.safetensors").exists()


def test_user_errors_are_messages(tmp_path, capsys):
    assert main(["pretrain", "--method", "nope", "--data", str(tmp_path)]) == 2
    assert "available methods" in capsys.readouterr().err
    assert main(["pretrain", "--method", "simclr", "--data", str(tmp_path / "missing")]) == 2
    assert "data folder not found" in capsys.readouterr().err
