"""The Hugging Face Hub, through huggingface_hub's own API: uploading a folder fastdca wrote, and resolving
a Hub repository id to a local folder for loading."""

from __future__ import annotations

import os

# save_pretrained / push_to_hub arguments that concern the upload, as transformers names them
UPLOAD_ARGUMENTS = ("repo_id", "token", "private", "commit_message", "revision", "create_pr")


def upload_folder(folder, repo_id, *, token=None, private=None, commit_message=None, revision=None, create_pr=False):
    """Create `repo_id` if it does not exist and upload every file of `folder` to it in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
                             commit_message=commit_message or "Upload a fastdca DCA adapter")


def local_folder(name_or_path, *, revision=None, token=None, cache_dir=None) -> str:
    """`name_or_path` itself when it is a local folder, else the Hub repository of that id downloaded (or
    found in the cache) by huggingface_hub's snapshot_download."""
    if os.path.isdir(str(name_or_path)):
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir)
