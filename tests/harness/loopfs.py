"""Loop-mounted ext4 images for the volume tests and bench/volumes.

    with loop_ext4(tmp_path / "disk.img", tmp_path / "mnt") as fs:
        fs.mountpoint / "spool" ...
        fs.remount()        # umount + mount again (the page cache of the image's files is dropped)
    # always unmounted and detached here, even on failure

The image gets `mkfs.ext4 -O encrypt` (fscrypt works on it); a plain
directory on it is unencrypted, so the same image kind serves as the
control of the benchmark and of the proof.  Needs root and loop devices.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path


def loop_available() -> str | None:
    """None if loop-mounted ext4 works here, else the reason it does not."""
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("/usr/sbin/mkfs.ext4", "/usr/sbin/losetup"):
        if not os.path.exists(tool):
            return f"{tool} is missing (e2fsprogs, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: no loop devices"
    return None


def _run(*args, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


class LoopFS:
    def __init__(self, image: Path, mountpoint: Path):
        self.image, self.mountpoint = Path(image), Path(mountpoint)
        self.device: str | None = None

    def mount(self) -> None:
        self.device = _run("losetup", "--find", "--show", str(self.image)).stdout.strip()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "ext4", self.device, str(self.mountpoint))

    def umount(self) -> None:
        if self.device is None:
            return
        for attempt in range(20):
            if _run("umount", str(self.mountpoint), check=False).returncode == 0 \
                    or not os.path.ismount(self.mountpoint):
                break
            time.sleep(0.25)            # a process of the test still closing its files
        else:
            _run("umount", "--lazy", str(self.mountpoint), check=False)
        _run("losetup", "-d", self.device, check=False)
        self.device = None

    def remount(self) -> None:
        self.umount()
        self.mount()

    def raw(self) -> bytes:
        """The image's bytes (unmount first for a settled image)."""
        return self.image.read_bytes()


@contextlib.contextmanager
def loop_ext4(image: Path, mountpoint: Path, size_mib: int = 64):
    """A fresh ext4 image with the encrypt feature, loop-mounted; always
    unmounted and its loop device detached on the way out."""
    image = Path(image)
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    _run("mkfs.ext4", "-q", "-F", "-O", "encrypt", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    fs = LoopFS(image, mountpoint)
    try:
        fs.mount()
        yield fs
    finally:
        fs.umount()
