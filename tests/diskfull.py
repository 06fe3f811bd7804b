"""A full filesystem for the tests of issue #21's class 3 (every writer on a full disk: one line naming the path,
no partial output, no temporary file, previous outputs untouched).

    full_disk fixture (conftest): FullDisk(directory, mode); .fill() makes every new write below .directory fail
    with ENOSPC. mode "tmpfs": a real 64 KiB tmpfs mounted there (root only, as CI runs; skipped visibly
    elsewhere) and filled; mode "patched": the atomic writers' temporary files are made links to /dev/full,
    whose every write fails with ENOSPC, so the writers' real error paths run anywhere.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path


class FullDisk:
    def __init__(self, directory: Path, mode: str, monkeypatch):
        self.directory, self.mode, self._monkeypatch = directory, mode, monkeypatch
        self.mounted = False

    def mount(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.mode != "tmpfs":
            return
        if os.geteuid() != 0:
            import pytest

            pytest.skip("a tmpfs needs root (CI runs as root); the patched variant of this test runs instead")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(self.directory)], capture_output=True, text=True)
        if proc.returncode:
            import pytest

            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the patched variant runs instead")
        self.mounted = True

    def fill(self) -> None:
        """Every later write below the directory fails with ENOSPC (what was written before stays)."""
        if self.mode == "tmpfs":
            filler = self.directory / f"filler-{uuid.uuid4().hex}"
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 512)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            self.filler = filler
            return
        from wenyan import files as common

        real = common._temp_beside

        def to_dev_full(path):
            tmp = real(path)
            if Path(os.path.abspath(tmp)).is_relative_to(self.directory.resolve()):
                tmp.unlink()
                tmp.symlink_to("/dev/full")
            return tmp

        self._monkeypatch.setattr(common, "_temp_beside", to_dev_full)

    def files(self) -> dict[str, bytes]:
        """Every regular file below the directory (not the filler), by relative path."""
        return {p.relative_to(self.directory).as_posix(): p.read_bytes() for p in sorted(self.directory.rglob("*"))
                if p.is_file() and not p.name.startswith("filler-")}

    def leftovers(self) -> list[str]:
        """Temporary files or links left below the directory."""
        return sorted(p.name for p in self.directory.rglob("*") if p.name.endswith(".tmp") or p.is_symlink())

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.directory)], check=False)
