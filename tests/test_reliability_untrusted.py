"""Untrusted files: nothing is unpickled without an opt-in by name, config.json and recipe
YAML are validated with errors that say what was expected, hub loads say (and can pin) the
commit, and archive extraction refuses path traversal."""
from __future__ import annotations

import ast
import io
import json
import logging
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest

from sslfeatures import Encoder, Pretrainer
from sslfeatures.config import ConfigError
from sslfeatures.data.archive import UnsafeArchiveError, safe_extract, safe_member_name
from sslfeatures.encoder import UnsafeFileError

PKG = Path(__file__).resolve().parents[1] / "sslfeatures"


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory) -> Path:
    enc = Encoder.random_init("resnet18", image_size=16, stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]},
                              device="cpu")
    return enc.save_pretrained(tmp_path_factory.mktemp("enc") / "e")


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: the code-execution a pickle allows."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_never_runs(enc_dir, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_bytes((enc_dir / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(str(marker))}))
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        Encoder.from_pretrained(folder)
    with pytest.raises(pickle.UnpicklingError):  # opted in: tensors only (weights_only), the payload is refused
        Encoder.from_pretrained(folder, allow_pickle=True)
    assert not marker.exists()


def _calls(tree: ast.AST, dotted: str):
    head, attr = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == head:
            yield node


def test_no_code_path_unpickles_without_an_opt_in():
    """Static guard over the package: every torch.load is weights_only=True behind the
    allow_pickle opt-in; no pickle/joblib/dill loads, no np.load(allow_pickle=True), no
    unsafe yaml.load."""
    for path in PKG.rglob("*.py"):
        src = path.read_text()
        tree = ast.parse(src)
        for name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "joblib.load", "dill.load", "yaml.load",
                     "yaml.unsafe_load", "marshal.loads", "shelve.open"):
            assert not list(_calls(tree, name)), f"{path}: {name}"
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{path}:{call.lineno}: torch.load without weights_only=True"
            assert "allow_pickle" in src, f"{path}: torch.load without an allow_pickle opt-in"
        for call in _calls(tree, "np.load"):
            kw = {k.arg: k.value for k in call.keywords}
            ap = kw.get("allow_pickle")
            assert ap is None or (isinstance(ap, ast.Constant) and ap.value is False), f"{path}:{call.lineno}"


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(image_size="224"), r"'image_size' should be int, got '224'"),
    (lambda c: c.update(mean=[0.5, 0.5]), r"'mean' should be tuple\[float, float, float\]"),
    (lambda c: c.update(crop_pct=0), r"crop_pct must be in \(0, 1\]"),
    (lambda c: c.update(evil_hook="os.system"), r"unknown key\(s\) \['evil_hook'\]; an encoder config.json holds only"),
    (lambda c: c.pop("backbone"), r"missing key 'backbone' \(expected dict\)"),
    (lambda c: c["backbone"].update(name=7), r"backbone: 'name' should be str"),
    (lambda c: c["backbone"].update(typo_stem="x"), r"backbone: unknown key\(s\) \['typo_stem'\]"),
])
def test_config_json_is_validated(enc_dir, tmp_path, edit, expected):
    cfg = json.loads((enc_dir / "config.json").read_text())
    edit(cfg)
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((enc_dir / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=expected):
        Encoder.from_pretrained(folder)


def test_config_json_not_json_or_not_an_object(enc_dir, tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((enc_dir / "model.safetensors").read_bytes())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Encoder.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        Encoder.from_pretrained(folder)


@pytest.mark.parametrize("text, expected", [
    ("method: simclr\nepochs: ten\n", r"epochs: expected int \| float, got 'ten'"),
    ("method: simclr\nbatch_size: ten\n", r"batch_size: expected an integer, got 'ten'"),
    ("method: simclr\nepoch: 10\n", r"r.yaml\]: unknown key\(s\) \['epoch'\]; valid keys are \[.*'epochs'"),
    ("method: simclr\nlr: [0.1]\n", r"lr: expected float \| None"),
    ("method: simclr\nviews: 3\n", r"views: expected a list"),
    ("method: simclr\nviews:\n  - {scale: big}\n", r"views\[0\]: view.scale: expected a list"),
    ("method: simclr\nviews:\n  - {colour: 1}\n", r"unknown view option\(s\) \['colour'\]"),
    ("method: simclr\nmethod_args: [1]\n", r"method_args: expected a mapping"),
    ("method: simclr\nmethod_args: {temperature: hot}\n", r"method_args.temperature: expected a number"),
    ("method: simclr\nmethod_args: {temprature: 0.1}\n", r"unknown key\(s\) \['temprature'\]; valid keys"),
    ("method: simclr\non_nonfinite: maybe\n", r"expected one of \['raise', 'skip'\]"),
    ("method: simclr\nstrict: 1\n", r"strict: expected true/false"),
    ("- just\n- a list\n", r"a recipe must be a mapping"),
    ("method: simclr\nepochs: [1\n", r"is not valid YAML"),
])
def test_recipe_yaml_is_validated(tmp_path, text, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        Pretrainer("simclr", recipe=recipe)


def test_unknown_overrides_name_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        Pretrainer("simclr", epoch=10)
    assert "unknown option 'epoch'" in str(err.value)
    assert "engine options:" in str(err.value) and "'epochs'" in str(err.value)


def test_hub_loads_say_which_commit_and_pass_the_pin(enc_dir, tmp_path, monkeypatch, caplog):
    hub = pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((enc_dir / name).read_bytes())
    calls = []

    def fake_download(repo_id, revision=None, **kw):
        calls.append(revision)
        return str(snap)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    caplog.set_level(logging.WARNING)
    enc = Encoder.from_pretrained("org/model")
    assert enc.hub_revision == commit
    assert any(f"revision='{commit}'" in r.getMessage() for r in caplog.records)  # how to pin it
    caplog.clear()
    enc = Encoder.from_pretrained("org/model", revision=commit)
    assert calls == [None, commit] and enc.hub_revision == commit
    assert not [r for r in caplog.records if "pin it" in r.getMessage()]  # pinned: nothing to warn about


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tf.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, payload
                tf.addfile(info)
            elif kind == "dev":
                info.type = tarfile.CHRTYPE
                tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("members, expected", [
    ([("../evil.txt", "file", b"x")], "path traversal"),
    ([("ok/../../evil.txt", "file", b"x")], "path traversal"),
    ([("/tmp/evil.txt", "file", b"x")], "absolute path"),
    ([("link", "sym", "/etc")], "absolute"),
    ([("link", "sym", "../../outside")], "outside the destination"),
    ([("a/b", "sym", ".."), ("a/b/c", "sym", "../..")], "outside the destination"),
    ([("hard", "hard", "../../etc/passwd")], "path traversal"),
    ([("dev", "dev", b"")], "device"),
])
def test_tar_extraction_refuses_path_traversal(tmp_path, members, expected):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar(members))
    dest = tmp_path / "sub" / "dest"
    with pytest.raises(UnsafeArchiveError, match=expected):
        safe_extract(archive, dest)
    outside = [p for p in tmp_path.rglob("*") if p.name in ("evil.txt", "outside")]
    assert not outside


def test_zip_extraction_refuses_path_traversal_and_bombs(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./\.\./evil\.txt' points outside"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "fine.txt").exists()  # checked before anything is written
    with zipfile.ZipFile(tmp_path / "big.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * 100_000)
    with pytest.raises(UnsafeArchiveError, match="expands to more than"):
        safe_extract(tmp_path / "big.zip", tmp_path / "d2", max_bytes=10_000)


def test_safe_archives_extract(tmp_path):
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in (("imgs/a.txt", b"a"), ("imgs/sub/b.txt", b"b")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("imgs/link.txt")
        info.type, info.linkname = tarfile.SYMTYPE, "a.txt"
        tf.addfile(info)
    files = safe_extract(archive, tmp_path / "out")
    assert sorted(os.path.relpath(f, tmp_path / "out") for f in files) == ["imgs/a.txt", "imgs/link.txt",
                                                                          "imgs/sub/b.txt"]
    assert (tmp_path / "out" / "imgs" / "link.txt").read_text() == "a"
    assert safe_member_name("./x/../y.jpg") == "y.jpg"
    for bad in ("", "../a", "/a", "C:/a", "a\x00b"):
        with pytest.raises(UnsafeArchiveError):
            safe_member_name(bad)
