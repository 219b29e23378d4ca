"""WordNet 3.0 for the caption labels, installed without nltk's download server if need be.

Caption words are mapped to WordNet noun synsets with nltk's WordNet reader, which reads the
corpus from ``<nltk_data dir>/corpora/wordnet``. ``nltk.download("wordnet")`` needs the internet;
many training hosts have none, but Debian/Ubuntu ship the same WordNet 3.0 database in the
``wordnet-base`` package (plus ``index.sense`` in ``wordnet-sense-index``). nltk additionally
needs a ``lexnames`` file (lexicographer file numbers, names and parts of speech) that the Debian
package only documents in its lexnames(5WN) man page, so it is written here.

``install_wordnet()`` tries, in order:

a. an installed WordNet folder (``/usr/share/wordnet`` from the Debian package, ``$WNSEARCHDIR``,
   ``$WNHOME/dict``, ...);
b. ``apt-get download wordnet-base wordnet-sense-index`` + ``dpkg-deb -x`` (neither needs root);
c. ``nltk.download("wordnet")`` (hosts with internet access).

The corpus is assembled in a temporary folder beside the destination and renamed into place once
it loads, so an interrupted install never leaves a half-written ``corpora/wordnet``.

Command line: ``python -m pretrain.data.synsets.wordnet [--target DIR]`` (default:
``<venv>/nltk_data``, which nltk searches by default; ``launch/setup.sh`` runs it).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The 45 lexicographer files of WordNet 3.0, in file-number order (lexnames(5WN)); used when the
# man page is not installed (Docker images often drop man pages).
LEXICOGRAPHER_FILES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
# Syntactic category numbers of the lexnames file's third column.
_CATEGORY_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
_PACKAGE_DATA_DIR = Path("usr/share/wordnet")
_LEXNAMES_MAN_PAGE = Path("usr/share/man/man5/lexnames.5WN.gz")
_SYSTEM_FOLDERS = (
    "/usr/share/wordnet",
    "/usr/local/share/wordnet",
    "/usr/local/WordNet-3.0/dict",
    "/opt/homebrew/share/wordnet",
)
# A known synset of WordNet 3.0: proves the files are the version CoreNet's labels refer to.
CHECK_SYNSET = ("dog.n.01", 2084071)
_NLTK_DOWNLOAD_TIMEOUT_S = 60.0


class WordNetInstallError(RuntimeError):
    """No strategy could install WordNet; the message lists what was tried and why it failed."""


def default_target() -> Path:
    """``<sys.prefix>/nltk_data``: inside the virtual environment, on nltk's default search path."""
    return Path(sys.prefix) / "nltk_data"


def _corpus_dir(target: Path) -> Path:
    return target / "corpora" / "wordnet"


# ----------------------------------------------------------------------------- checks


def _reader(root: Any) -> Any:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    with warnings.catch_warnings():  # no Open Multilingual WordNet reader: not needed here
        warnings.filterwarnings("ignore", "The multilingual functions", UserWarning)
        return WordNetCorpusReader(root, None)


def _check_reader(reader: Any) -> None:
    name, offset = CHECK_SYNSET
    synset = reader.synset(name)
    if synset.offset() != offset:
        raise ValueError(f"{name} has offset {synset.offset()}, expected {offset} (WordNet 3.0)")


def _check_database(corpus: Path) -> None:
    """A staged WordNet 3.0 folder, checked without nltk's reader: that reader also maps to the
    corpus named "wordnet" on nltk's search path, which a first install does not have yet.
    Synset offsets are byte offsets into data.<pos>, so dog.n.01's line must start there."""
    for name in ("data.noun", "index.noun", "lexnames", "noun.exc"):
        if not (corpus / name).is_file():
            raise FileNotFoundError(f"{name} missing from the WordNet folder")
    _, offset = CHECK_SYNSET
    with (corpus / "data.noun").open("rb") as data:
        data.seek(offset)
        line = data.readline().decode("utf-8", "replace")
    if not line.startswith(f"{offset:08d} ") or " dog " not in line:
        raise ValueError(f"data.noun at offset {offset} is not dog.n.01: not WordNet 3.0")


def _working_reader(target: Path) -> Any | None:
    """A reader of the WordNet 3.0 (folder or nltk's zip) under ``target``; None if none works."""
    import nltk

    try:
        reader = _reader(nltk.data.find("corpora/wordnet", paths=[str(target)]))
        _check_reader(reader)
    except Exception:  # a missing, partial or foreign corpus: all mean "install"
        return None
    return reader


# ----------------------------------------------------------------------------- lexnames


def lexnames_lines(names: tuple[str, ...] = LEXICOGRAPHER_FILES) -> list[str]:
    """The ``lexnames`` file's lines: ``NN<tab>name<tab>category`` (1 noun ... 4 adverb)."""
    return [
        f"{number:02d}\t{name}\t{_CATEGORY_NUMBER[name.split('.')[0]]}"
        for number, name in enumerate(names)
    ]


def lexicographer_files_from_man_page(man_page: Path) -> tuple[str, ...] | None:
    """The file names listed in a lexnames(5WN) man page, or None when it does not list all 45."""
    text = gzip.decompress(man_page.read_bytes()).decode("utf-8", "replace")
    rows = [line.split("\t") for line in text.splitlines() if re.match(r"^\d\d\t", line)]
    names = tuple(row[1].strip() for row in rows if len(row) >= 2)
    numbers = [int(row[0]) for row in rows]
    complete = numbers == list(range(len(LEXICOGRAPHER_FILES)))
    known_categories = all(name.split(".")[0] in _CATEGORY_NUMBER for name in names)
    return names if complete and known_categories else None


def _write_lexnames(corpus: Path, man_page: Path | None) -> None:
    names = None
    if man_page is not None and man_page.is_file():
        names = lexicographer_files_from_man_page(man_page)
    (corpus / "lexnames").write_text("\n".join(lexnames_lines(names or LEXICOGRAPHER_FILES)) + "\n")


# ----------------------------------------------------------------------------- strategies


def _copy_database(source: Path, corpus: Path, man_page: Path | None) -> None:
    if not (source / "data.noun").is_file():
        raise FileNotFoundError(f"{source} has no data.noun")
    corpus.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copy2(path, corpus / path.name)
    if not (corpus / "lexnames").is_file():
        _write_lexnames(corpus, man_page)


def _system_folders() -> Iterator[Path]:
    if os.environ.get("WNSEARCHDIR"):
        yield Path(os.environ["WNSEARCHDIR"])
    if os.environ.get("WNHOME"):
        yield Path(os.environ["WNHOME"]) / "dict"
    yield from map(Path, _SYSTEM_FOLDERS)


def _from_system_folder(corpus: Path) -> str:
    tried = []
    for folder in _system_folders():
        if (folder / "data.noun").is_file():
            _copy_database(folder, corpus, Path("/") / _LEXNAMES_MAN_PAGE)
            return f"copied from {folder}"
        tried.append(str(folder))
    raise FileNotFoundError(f"no WordNet database in {', '.join(tried)}")


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(command)}` exited with {result.returncode}: {output}")


def _from_debian_packages(corpus: Path) -> str:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} not found (not a Debian/Ubuntu system)")
    with tempfile.TemporaryDirectory(prefix="wordnet-debs-") as scratch:
        scratch = Path(scratch)
        base, sense_index = DEBIAN_PACKAGES
        _run(["apt-get", "download", base], scratch)
        try:  # index.sense only serves sense-key look-ups: the corpus works without it
            _run(["apt-get", "download", sense_index], scratch)
        except RuntimeError as error:
            print(f"wordnet: {sense_index} not available ({error}); continuing", file=sys.stderr)
        extracted = scratch / "extracted"
        for deb in sorted(scratch.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(extracted)], scratch)
        _copy_database(extracted / _PACKAGE_DATA_DIR, corpus, extracted / _LEXNAMES_MAN_PAGE)
    return "extracted from the Debian packages " + " + ".join(DEBIAN_PACKAGES)


def _from_nltk_download(corpus: Path) -> str:
    import nltk

    download_dir = corpus.parent / (corpus.name + "-download")
    # Without a network nltk's urlopen may wait for a connect timeout it never sets.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_NLTK_DOWNLOAD_TIMEOUT_S)
    try:
        ok = nltk.download("wordnet", download_dir=str(download_dir), quiet=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    downloaded = download_dir / "corpora" / "wordnet"
    if not ok or not (downloaded / "data.noun").is_file():
        raise RuntimeError("nltk.download('wordnet') failed (no internet access?)")
    downloaded.rename(corpus)
    return "downloaded with nltk.download"


_STRATEGIES = (
    ("installed WordNet folder", _from_system_folder),
    ("apt-get download + dpkg-deb -x", _from_debian_packages),
    ("nltk.download", _from_nltk_download),
)


# ----------------------------------------------------------------------------- install


def _replace_atomically(staged: Path, destination: Path) -> None:
    """Rename ``staged`` to ``destination``, moving aside (then deleting) what was there."""
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=".wordnet-old-", dir=destination.parent))
        old.rmdir()
        destination.rename(old)
    staged.rename(destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _add_to_search_path(target: Path) -> None:
    import nltk

    if str(target) not in nltk.data.path:
        nltk.data.path.append(str(target))


def install_wordnet(target: str | Path | None = None) -> Path:
    """Make WordNet 3.0 loadable by nltk from ``target`` (default :func:`default_target`).

    Returns ``target``. Does nothing when nltk already loads WordNet from there. Raises
    :class:`WordNetInstallError`, listing each strategy's failure, when none works.
    ``target`` is added to ``nltk.data.path`` of this process (nltk reads corpora only from
    folders on that path); other processes find it when it is on nltk's default path (the
    default target is) or in ``$NLTK_DATA``.
    """
    target = Path(target) if target is not None else default_target()
    # nltk (3.9.3+) refuses to read corpora outside the folders on its search path.
    _add_to_search_path(target)
    if _working_reader(target) is not None:
        return target
    destination = _corpus_dir(target)
    destination.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for name, strategy in _STRATEGIES:
        # Staged beside the destination (same file system), so the final rename is atomic.
        staging = Path(tempfile.mkdtemp(prefix=".wordnet-staging-", dir=destination.parent))
        corpus = staging / "wordnet"
        try:
            how = strategy(corpus)
            _check_database(corpus)
            _replace_atomically(corpus, destination)
        except Exception as error:
            failures.append(f"  {name}: {error}")
            continue
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if _working_reader(target) is None:  # in place now: nltk's own reader must load it
            shutil.rmtree(destination, ignore_errors=True)
            failures.append(f"  {name}: nltk cannot read the installed folder")
            continue
        print(f"wordnet: {how} into {destination}", file=sys.stderr)
        return target
    raise WordNetInstallError(
        f"could not install WordNet into {destination}; tried:\n"
        + "\n".join(failures)
        + "\nInstall the Debian package wordnet-base (sudo apt-get install wordnet-base), or run "
        "nltk.download('wordnet') on a machine with internet access and copy its nltk_data folder."
    )


def load_wordnet() -> Any:
    """nltk's WordNet corpus reader, loaded; a RuntimeError saying how to install it if missing."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError as error:
        raise RuntimeError(
            "WordNet is not installed for nltk. Install it with "
            "`python -m pretrain.data.synsets.wordnet` (or `bash launch/setup.sh`); works offline "
            "on Debian/Ubuntu."
        ) from error
    return wordnet


def _on_default_path(target: Path) -> bool:
    import nltk

    return target.resolve() in {Path(p).resolve() for p in nltk.data.path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--target", type=Path, default=None, help="nltk_data folder (default: <venv>/nltk_data)"
    )
    args = parser.parse_args(argv)
    target = args.target if args.target is not None else default_target()
    found_by_default = _on_default_path(target)  # before install_wordnet adds it
    _add_to_search_path(target)
    reader = _working_reader(target)
    if reader is None:
        install_wordnet(target)
        reader = _working_reader(target)
    name, _ = CHECK_SYNSET
    print(f"WordNet {reader.get_version()} ready in {_corpus_dir(target)}")
    print(f"check: {name} offset {reader.synset(name).offset()}")
    if not found_by_default:
        print(f"note: {target} is not on nltk's default path; export NLTK_DATA={target}")


if __name__ == "__main__":
    main()
