"""`align configs`: the recipe configs that ship inside the package.

    align configs list              the model folders, and the command and purpose of each file
    align configs copy MODEL DIR    MODEL's folder written to DIR (new or empty), ready to edit

The configs are recipes/configs/<model>/ of the repository; the package holds them as
align/configs (a link in a checkout, files in a wheel), with the launcher configs of
recipes/accelerate as align/launchers. A copy keeps every comment; the commands in it are
rewritten to the installed form (`python recipes/sft.py --config recipes/configs/m/sft.yaml`
becomes `align sft --config DIR/sft.yaml`), so the first line of each YAML still runs it.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from align.core.files import atomic_dir
from align.core.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1]
CONFIGS_DIR = PACKAGE / "configs"
LAUNCHERS_DIR = PACKAGE / "launchers"
SHIPPED_SUFFIXES = (".yaml", ".md")

# recipes/<script>.py -> its `align` command, where the two differ only in spelling.
_SCRIPT = re.compile(r"(?P<python>python3? )?recipes/(?P<script>\w+)\.py\b")


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    command: str  # the first line's command, as shipped
    purpose: str  # the comment lines after it, joined


def model_folders() -> dict[str, Path]:
    if not CONFIGS_DIR.is_dir():
        raise ConfigError(f"{CONFIGS_DIR}: the shipped configs are missing from this installation of align")
    return {p.name: p for p in sorted(CONFIGS_DIR.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))}


def describe_file(path: Path) -> ConfigFile:
    lines = path.read_text(encoding="utf-8").splitlines()
    comments = []
    for line in lines:
        if not line.startswith("#"):
            break
        comments.append(line.lstrip("# ").strip())
    command = comments[0] if comments else ""
    return ConfigFile(path, command, " ".join(c for c in comments[1:] if c))


def _model_name(folder: Path) -> str:
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    for path in sorted(folder.glob("*.yaml")):
        model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
        if model.get("name_or_path"):
            return str(model["name_or_path"])
    return folder.name


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def list_lines() -> list[str]:
    out = []
    for name, folder in model_folders().items():
        files = sorted(p for p in folder.iterdir() if p.suffix == ".yaml")
        out.append(f"{name}: {_model_name(folder)} ({len(files)} configs{', README.md' if (folder / 'README.md').is_file() else ''})")
        for path in files:
            info = describe_file(path)
            command = installed_form(info.command, folder.name, "DIR").split(" --config")[0]
            out.append(f"  {path.name:<24}{command:<24}{_cut(info.purpose, 72)}")
        out.append("")
    out.append("align configs copy MODEL DIR writes a folder to edit; each YAML's first line is the command that runs it.")
    return out


def installed_form(text: str, model: str, dest: str) -> str:
    """`text` with the checkout's commands and paths rewritten for a copy of `model`'s folder in `dest`."""
    from align.cli.main import command_for_script

    def script(match: re.Match) -> str:
        command = command_for_script(match["script"])
        if command is None:  # a checkout-only script (benchmarks, smoke tests): left as it is
            return match[0]
        return f"align {command}" if match["python"] else f"-m align {command}"

    text = _SCRIPT.sub(script, text)
    text = text.replace(f"recipes/configs/{model}/", f"{dest}/")
    return text.replace("recipes/accelerate/", f"{dest}/accelerate/")


def _launcher_text(name: str, model: str, dest: str) -> str:
    """A launcher config's own header runs some recipe of the checkout; in the copy it runs this folder's."""
    text = installed_form((LAUNCHERS_DIR / name).read_text(encoding="utf-8"), model, dest)
    return re.sub(r"recipes/configs/[\w.-]+/", f"{dest}/", text)


def copy_folder(model: str, dest: Path, shown: str) -> list[Path]:
    """Write `model`'s configs (and the launcher configs they name) into `dest`; returns the files written."""
    import difflib

    folders = model_folders()
    if model not in folders:
        close = difflib.get_close_matches(model, list(folders), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config folder '{model}'{hint}; `align configs list` shows: {', '.join(folders)}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest}: exists and is not an empty folder; copy into a new one")
    texts = {
        path.name: installed_form(path.read_text(encoding="utf-8"), model, shown)
        for path in sorted(folders[model].iterdir()) if path.suffix in SHIPPED_SUFFIXES
    }
    launchers = sorted({m for text in texts.values() for m in re.findall(re.escape(f"{shown}/accelerate/") + r"([\w.-]+\.yaml)", text)})
    for name in launchers:
        if not (LAUNCHERS_DIR / name).is_file():
            raise ConfigError(f"{folders[model]}: names the launcher config recipes/accelerate/{name}, which is not shipped")
    with atomic_dir(dest) as staging:  # an empty `dest` is replaced by the complete copy, in one rename
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        if launchers:
            (staging / "accelerate").mkdir()
        for name in launchers:
            (staging / "accelerate" / name).write_text(_launcher_text(name, model, shown), encoding="utf-8")
    return sorted(dest.rglob("*.*"))


def main(argv: list[str] | None = None, prog: str = "align configs") -> int:
    from align.cli.recipes import guarded

    p = argparse.ArgumentParser(prog=prog, description="The recipe configs shipped with align.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the model folders and what each holds")
    c = sub.add_parser("copy", help="write a model folder's configs to DIR (new or empty) to edit them")
    c.add_argument("model", help="a folder of `align configs list`, e.g. smollm2-135m")
    c.add_argument("dir", help="where the copy goes (a new or empty folder)")
    args = p.parse_args(argv)

    def work() -> int:
        if args.action == "list":
            print("\n".join(list_lines()))
            return 0
        shown = args.dir.rstrip("/") or "/"
        written = copy_folder(args.model, Path(args.dir), shown)
        print(f"copied {len(written)} files of {args.model} to {args.dir}:")
        for path in written:
            first = describe_file(path).command if path.suffix == ".yaml" else ""
            print(f"  {str(path.relative_to(args.dir)):<24}{first}".rstrip())
        return 0

    return guarded(work, command=prog)
