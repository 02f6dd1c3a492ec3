"""Publishing an encoder to a Hugging Face hub repository (through ``huggingface_hub``).

:func:`push_to_hub` exports the encoder into a temporary folder (every file verified, the
model card written), creates the repository if needed and uploads the folder as one
commit. Load it back, pinned to that commit, with
``Encoder.from_pretrained(repo_id, revision=commit.oid)``.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("sslfeatures.export")


def push_to_hub(encoder: Any, repo_id: str, *, formats: Sequence[str] = ("safetensors",),
                quantize: str | Sequence[str] | None = None, revision: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                api: Any = None, **export_kwargs: Any) -> Any:
    """Export ``encoder`` and upload it to ``repo_id`` (``"org/name"``) as one commit.

    ``formats`` / ``quantize`` / ``export_kwargs`` go to :meth:`Encoder.export` (e.g.
    ``formats=["safetensors", "onnx"], quantize="int8", calibration="images/"``;
    ``data_description=``, ``license=`` and ``knn=`` fill the model card). ``revision``:
    the branch to commit to (created when missing). ``api``: a ``huggingface_hub.HfApi``
    (or an object with its ``create_repo`` / ``create_branch`` / ``upload_folder``);
    default ``HfApi(token=token)``. Returns ``upload_folder``'s ``CommitInfo`` (its ``oid``
    is the commit to pin with ``revision=``).
    """
    if not isinstance(repo_id, str) or len(repo_id.split("/")) != 2 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError:  # pragma: no cover - a core dependency
            raise ImportError("push_to_hub needs huggingface-hub: pip install huggingface-hub") from None
        api = HfApi(token=token)
    from .exporter import export_encoder

    with tempfile.TemporaryDirectory(prefix="sslfeatures-push-") as tmp:
        files = export_encoder(encoder, tmp, formats=formats, quantize=quantize, repo_id=repo_id, **export_kwargs)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        message = commit_message or (f"sslfeatures: {encoder.config.get('method') or 'encoder'} "
                                     f"{encoder.config['backbone']['name']} ({', '.join(sorted(files))})")
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision,
                                 commit_message=message, create_pr=create_pr)
    log.info("pushed %s to %s (%s)", sorted(files), repo_id, getattr(info, "oid", info))
    return info


__all__ = ["push_to_hub"]
