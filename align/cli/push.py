"""`align push RUN --repo OWNER/NAME`: publish a finished run on the Hugging Face Hub.

    align push RUN --repo OWNER/NAME [--private] [--merged] [--revision BRANCH] [--dry-run] [--output DIR]

First the folder to upload is written (default: `<RUN>-hub` beside the run): the adapter (or, with
--merged, the adapter merged into its base), the tokenizer, each run's resolved config under
align/, and a model card (align/modeling/model_card.py). Then one commit of exactly that folder goes
to the Hub through huggingface_hub. --dry-run stops after the folder. Without a token or network
the command stops with one line that names the folder.

Refused, before anything is written: a run that is not finished, a run dir holding anything but data
(code, pickles outside its checkpoints, links or unexpected files where the published files come from),
and a secret in any file of the folder (then the folder is not kept).
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from align.core.artifacts import RunDir, check_replaceable, mark_output

from align.core.files import atomic_dir

from align.core.redaction import redact_text, secret_values
from align.core.errors import AlignError, ConfigError

# What a published model folder holds: data that transformers/PEFT read without running code.
MODEL_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
# Files that run code when loaded or executed: never in a run dir that is published.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dylib", ".dll", ".exe", ".sh", ".bash", ".bat", ".cmd", ".ps1")
# Pickles: align reads them only in checkpoints/ (torch.load(weights_only=True)); anywhere else they are not data.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CONFIGS_FOLDER = "align"  # the published folder's copy of each run's resolved config
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer_config.json",)


class PushFailed(AlignError):
    """The folder is written but the upload did not happen (no token, no network, the Hub said no)."""

    exit_code = 1


@dataclass
class Publication:
    run: RunDir
    repo: str
    merged: bool
    base_model: str | None
    license: str | None


# --------------------------------------------------------------------------- what may be published


def check_publishable(path: Path) -> RunDir:
    """A finished align run dir holding only data; anything else is refused with one line."""
    run = RunDir(path)
    if not run.is_run_dir():
        raise ConfigError(f"{path}: not an align run dir (no {run.marker_path.name}); push takes a RunDir")
    status = run.status
    if status != "finished":
        raise ConfigError(f"{path}: the run's status is '{status}'; only a finished run is pushed")
    problems = not_data(run.path)
    if problems:
        raise ConfigError(f"{path}: holds files that are not data, so it is not published: {', '.join(problems[:5])}"
                          + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
    return run


def not_data(root: Path) -> list[str]:
    """Paths under `root` that a published run may not hold (relative, sorted): code anywhere, pickles
    outside checkpoints/, and links where the published files are read from (adapter/, merged/, config.yaml)."""
    found = []
    for name in ("adapter", "merged", "config.yaml", "manifest.json"):
        if (root / name).is_symlink():
            found.append(f"{name} (a link)")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_symlink() or not path.is_file():
            continue  # W&B links its own logs from elsewhere; nothing is read through a link
        suffix = path.suffix.lower()
        if suffix in CODE_SUFFIXES:
            found.append(f"{rel} (code)")
        elif suffix in PICKLE_SUFFIXES and rel.parts[0] != "checkpoints":
            found.append(f"{rel} (a pickle)")
    return found


def _model_files(folder: Path) -> list[Path]:
    """The files of an adapter or model folder to publish; any file that is not model data is refused."""
    files, other = [], []
    for path in sorted(folder.iterdir()):
        if path.name == "README.md" or path.name.startswith(".align-"):
            continue  # PEFT's template card (ours replaces it) and align's own markers
        if path.is_file() and not path.is_symlink() and path.suffix in MODEL_SUFFIXES:
            files.append(path)
        else:
            other.append(path.name)
    if other:
        raise ConfigError(f"{folder}: holds files that are not model data ({', '.join(other)}); nothing is published")
    return files


def find_secrets(folder: Path) -> list[str]:
    """Files of `folder` that hold a secret: an environment secret's value, or a token-shaped string."""
    secrets = secret_values()
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        text = _searchable_text(path)
        if redact_text(text, secrets) != text:
            found.append(str(path.relative_to(folder)))
    return found


def _searchable_text(path: Path) -> str:
    """A file's text; of a safetensors file its JSON header (the rest is numbers)."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            return f.read(min(size, 100 * 2**20)).decode("utf-8", errors="replace")
    return path.read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- the folder


def write_folder(pub: Publication, out: Path) -> list[Path]:
    """Write the folder that is uploaded; returns its files (relative paths, sorted)."""
    from align.modeling.model_card import CardOptions, lineage_runs, model_card

    with atomic_dir(out) as tmp:
        _write_model(pub, tmp)
        config_files = {}
        for i, current in enumerate(reversed(lineage_runs(pub.run)), start=1):
            stage = (current.manifest() or {}).get("stage", "run")
            name = f"{CONFIGS_FOLDER}/{i}-{stage}.yaml"
            (tmp / CONFIGS_FOLDER).mkdir(exist_ok=True)
            shutil.copyfile(current.path / "config.yaml", tmp / name)
            config_files[str(current.path)] = name
        options = CardOptions(repo=pub.repo, merged=pub.merged, hub=True, base_model=pub.base_model,
                              license=pub.license, config_files=config_files)
        (tmp / "README.md").write_text(model_card(pub.run, options), encoding="utf-8")
        leaked = find_secrets(tmp)
        if leaked:
            raise ConfigError(f"{pub.run.path}: a secret (a token or key) is in {', '.join(leaked)}; nothing is written or published")
        mark_output(tmp, "push")
    return commit_files(out)


def _write_model(pub: Publication, tmp: Path) -> None:
    run = pub.run
    has_adapter = (run.adapter_dir / "adapter_config.json").is_file()
    if pub.merged and (run.merged_dir / "config.json").is_file():
        source = run.merged_dir  # SFT (and full fine-tuning) keep their merged model
    elif pub.merged and has_adapter:
        _merge_into(run, tmp)
        return
    elif has_adapter:
        source = run.adapter_dir
    else:
        raise ConfigError(f"{run.path}: has no adapter/ to publish" + (" (--merged publishes its merged/ model)"
                                                                    if (run.merged_dir / "config.json").is_file() else ""))
    for path in _model_files(source):
        shutil.copy2(path, tmp / path.name)
    if not any((tmp / name).is_file() for name in TOKENIZER_FILES):
        _save_tokenizer(run, tmp)


def _merge_into(run: RunDir, tmp: Path) -> None:
    """The run's adapter merged into its base (the model it trained on), written into `tmp`."""
    from align.modeling import models
    from align.modeling.adapters import merge_adapter
    from align.modeling.adapter_sets import resolve_adapter

    source = resolve_adapter(run.path)
    merged = tmp / ".merged"
    merge_adapter(source.base, source.model_cfg, source.adapter_dir, merged, models.load_tokenizer(source.base, source.model_cfg))
    for path in _model_files(merged):
        path.rename(tmp / path.name)
    shutil.rmtree(merged)


def _save_tokenizer(run: RunDir, tmp: Path) -> None:
    from align.modeling import models
    from align.modeling.adapter_sets import resolve_adapter

    source = resolve_adapter(run.path)
    models.load_tokenizer(source.base, source.model_cfg).save_pretrained(tmp)


def commit_files(folder: Path) -> list[Path]:
    """The folder's files that the commit uploads (align's marker stays local), relative and sorted."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".align-"))


def commit_operations(folder: Path) -> list:
    """The commit: one CommitOperationAdd per file of the folder."""
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(folder / rel)) for rel in commit_files(folder)]


# --------------------------------------------------------------------------- the upload


def upload(folder: Path, repo: str, private: bool, revision: str | None) -> str:
    """One commit of `folder` to the model repo `repo` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PushFailed(f"not pushed: no Hugging Face token (set HF_TOKEN or run `hf auth login`); the folder is ready: {folder}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.create_commit(repo, operations=commit_operations(folder), revision=revision,
                                 commit_message=f"align push {folder.name}")
    except Exception as exc:  # noqa: BLE001 - network, auth and Hub errors all mean "not pushed"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PushFailed(f"not pushed to {repo}: {type(exc).__name__}: {redact_text(first)[:200]}; the folder is ready: {folder}") from None
    return info.commit_url


def card_notes(pub: Publication) -> list[str]:
    """What the card's metadata lacks, and the option that supplies it."""
    from align.modeling.model_card import CardOptions, metadata

    meta = metadata(pub.run, CardOptions(hub=True, merged=pub.merged, base_model=pub.base_model, license=pub.license))
    notes = []
    if "base_model" not in meta:
        notes.append("the base model is not a Hub model (a local folder): the card has no base_model; --base-model sets it")
    if "license" not in meta:
        notes.append("no license found for the base model: the card has none; --license sets it")
    return notes


def cmd_push(args) -> int:
    if not REPO_ID.match(args.repo):
        raise ConfigError(f"--repo: expected OWNER/NAME, got '{args.repo}'")
    if args.base_model is not None and not REPO_ID.match(args.base_model):
        raise ConfigError(f"--base-model: expected a Hub model id OWNER/NAME, got '{args.base_model}'")
    if args.revision is not None and not args.revision.strip():
        raise ConfigError("--revision: empty branch name")
    run = check_publishable(Path(args.run))
    out = Path(args.output) if args.output else run.path.with_name(f"{run.path.name}-hub")
    check_replaceable(out, "--output")
    pub = Publication(run, args.repo, args.merged, args.base_model, args.license)
    files = write_folder(pub, out)
    size = sum((out / f).stat().st_size for f in files) / 2**20
    print(f"wrote {out}: {len(files)} files, {size:.2f} MB ({', '.join(str(f) for f in files)})")
    for note in card_notes(pub):
        print(f"note: {note}")
    if args.dry_run:
        print(f"dry run: nothing uploaded; `align push {args.run} --repo {args.repo}` uploads {out}")
        return 0
    url = upload(out, args.repo, args.private, args.revision)
    print(f"pushed {out} to https://huggingface.co/{args.repo}" + (f" (branch {args.revision})" if args.revision else "") + f": {url}")
    return 0


def main(argv: list[str] | None = None, prog: str = "align push") -> int:
    from align.cli.recipes import run_command

    p = argparse.ArgumentParser(prog=prog, description="Publish a finished run (adapter or merged model, tokenizer, "
                                "model card) on the Hugging Face Hub.")
    p.add_argument("run", help="a finished RunDir")
    p.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the Hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--merged", action="store_true", help="publish the adapter merged into its base: one standalone model")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created if missing) instead of main")
    p.add_argument("--dry-run", action="store_true", help="write the folder to upload and stop")
    p.add_argument("--output", help="where the folder to upload is written (default: <RUN>-hub beside the run)")
    p.add_argument("--base-model", help="the card's base_model when the run's base is a local folder (a Hub model id)")
    p.add_argument("--license", help="the card's license when the base model's is not found")
    return run_command(p, argv, cmd_push, prog)


if __name__ == "__main__":
    sys.exit(main())
