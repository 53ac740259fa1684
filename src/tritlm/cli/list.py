"""`tritlm list`: the models in the Hugging Face Hub cache, with their sizes and paths."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "list", help="list the models in the Hugging Face Hub cache",
        description="List the model repos in the Hugging Face Hub cache (HF_HOME, shared with other "
                    "tools): each cached revision with its branches, size and files, and each "
                    "file's size and path. `tritlm pull` adds to it.")
    p.set_defaults(func=run)


def run(args) -> int:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from ..hub import cache_dir, human_size

    try:
        repos = [r for r in scan_cache_dir().repos if r.repo_type == "model"]
    except CacheNotFound:
        repos = []
    if not repos:
        print(f"no models in {cache_dir()}; fetch one with `tritlm pull ORG/REPO`")
        return 0
    for repo in sorted(repos, key=lambda r: r.repo_id.lower()):
        for rev in sorted(repo.revisions, key=lambda r: -r.last_modified):
            refs = ", ".join(sorted(rev.refs))
            print(f"{repo.repo_id}  {refs + ' ' if refs else ''}({rev.commit_hash[:10]})  "
                  f"{human_size(rev.size_on_disk)}  {len(rev.files)} file{'s' if len(rev.files) != 1 else ''}")
            for f in sorted(rev.files, key=lambda f: str(f.file_path)):
                print(f"  {human_size(f.size_on_disk):>9}  {f.file_path}")
    return 0
