"""Debian packages through a private apt tree: the system's apt state is never touched.

A tree is a folder with its own sources, lists, status file and download cache; ``apt-get`` reads
it through ``-o Dir::...`` options. With an empty status file, ``install --download-only`` fetches
the named packages *and their whole dependency closure* (nothing counts as installed), which is
how a minimal foreign-architecture root is assembled: unpack every ``.deb`` with ``dpkg-deb -x``
(no maintainer scripts run, which a foreign root could not run anyway).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class AptError(RuntimeError):
    """apt-get or dpkg-deb failed, or is missing."""


def missing_tools() -> list[str]:
    """Host tools this module needs that are not on PATH."""
    return [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]


def apt_tree(folder: Path, suite: str, arch: str | None = None) -> list[str]:
    """Create (or reuse) a private apt tree for ``suite`` and return the apt-get options that use it.

    ``arch``: the architecture apt treats as native (``arm64`` for a foreign root); default the host's.
    """
    for sub in ("etc/apt/sources.list.d", "etc/apt/preferences.d", "lists/partial", "cache/archives/partial"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    arch_line = f"Architectures: {arch}\n" if arch else ""
    (folder / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {MIRROR}\nSuites: {suite}\nComponents: main\n{arch_line}Signed-By: {KEYRING}\n"
    )
    status = folder / "status"
    if not status.exists():
        status.write_text("")
    opts = [
        f"Dir::Etc={folder}/etc/apt", "Dir::Etc::sourcelist=/dev/null",
        f"Dir::Etc::sourceparts={folder}/etc/apt/sources.list.d", f"Dir::Etc::preferencesparts={folder}/etc/apt/preferences.d",
        f"Dir::State={folder}", f"Dir::State::Lists={folder}/lists", f"Dir::State::status={status}",
        f"Dir::Cache={folder}/cache", "Debug::NoLocking=1", "APT::Sandbox::User=root",
    ]
    if arch:
        opts += [f"APT::Architecture={arch}", f"APT::Architectures::={arch}"]
    return [x for o in opts for x in ("-o", o)]


def _apt(opts: list[str], *args: str, cwd: Path | None = None) -> str:
    if missing_tools():
        raise AptError(f"{', '.join(missing_tools())} not found: this target's tools come from Debian packages")
    r = subprocess.run(["apt-get", "-q", *opts, *args], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise AptError(f"apt-get {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-1500:]}")
    return r.stdout


def update(opts: list[str]) -> None:
    _apt(opts, "update")


def download_closure(opts: list[str], tree: Path, packages: list[str]) -> list[Path]:
    """``packages`` and every dependency (empty status: nothing is installed); the ``.deb`` paths."""
    _apt(opts, "-y", "install", "--download-only", "--no-install-recommends", *packages)
    return sorted((tree / "cache/archives").glob("*.deb"))


def download(opts: list[str], dest: Path, packages: list[str]) -> list[Path]:
    """Only the named packages, no dependencies, into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    _apt(opts, "download", *packages, cwd=dest)
    return sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob("*.deb"))


def extract(deb: Path, dest: Path) -> None:
    r = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        raise AptError(f"dpkg-deb -x {deb.name} failed: {r.stderr.strip()[-500:]}")


def package_version(deb: Path) -> str:
    r = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True, check=True)
    return " ".join(line.split(": ", 1)[1] for line in r.stdout.strip().splitlines())
