"""How many threads torch runs and how they wait: chosen once, before torch loads, for a machine that is shared.

OpenMP reads its settings when torch loads, so ``patchnet/__init__.py`` calls ``configure`` before any module
imports torch (importing patchnet loads no torch). The count is the cores this process may use: its CPU
affinity (``os.sched_getaffinity``), hyperthread siblings counted once as torch counts them, and no more than a
cgroup CPU quota allows (a container's ``--cpus``; cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``). The
decoding workers of the loader take the CPUs left over (``loader_workers``). Where the machine is busy as the
process starts (``busy``), threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, and ``KMP_BLOCKTIME=0`` for
Intel and LLVM OpenMP; GNU OpenMP ignores it): by default they spin while they wait for each other, and on a
machine running a second job the spinning takes the cores the other job needs (two extraction processes on 2
cores: 2.2 s/image each spinning, 0.35 passive). On an idle machine they spin, which is faster alone. Where work
arrives later, the spinning threads of this process are the ones that suffer (5-7x their time alone beside a
passive second job), and the wait policy cannot change once torch has loaded: the ``governor`` then runs torch
on one thread, which has no one to wait for, until the other work ends (``tick``, called by the loops over
images and batches). Another thread count changes the last bits of a convolution or a matrix product (bf16
features: up to one unit in the last place), so a run that gave way is reproducible to its figures' noise,
not to the bit; a fixed count (``PATCHNET_THREADS=N``, ``OMP_NUM_THREADS``) has no governor.

The variables users know win: a count in ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, a wait policy in
``OMP_WAIT_POLICY``, ``KMP_BLOCKTIME`` or ``GOMP_SPINCOUNT`` is left as it is. ``PATCHNET_THREADS=N`` sets
the count, ``PATCHNET_THREADS=off`` sets nothing (torch's and OpenMP's own defaults). Where torch was imported
first (a notebook), only the count can still change: ``torch.set_num_threads``, and only downwards. A recipe's
``runtime.threads`` sets the count of a run (``use_threads``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

COUNT_VARS = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")  # torch reads both; MKL_NUM_THREADS wins
WAIT_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Choice:
    """What ``configure`` found and did."""

    cpus: int  # the logical CPUs this process may use: its affinity, capped by a cgroup quota
    threads: int  # torch's intra-op threads
    source: str  # where the count comes from: auto, PATCHNET_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS, off
    env: dict[str, str] = field(default_factory=dict)  # the variables set here (the user had set none of them)
    late: bool = False  # torch was loaded first: only torch.set_num_threads could act

    def __str__(self) -> str:
        if self.source == "off":
            return f"PATCHNET_THREADS=off: no thread variables set ({self.cpus} usable CPUs)"
        env = " ".join(f"{k}={v}" for k, v in self.env.items()) or "no variables set"
        late = "; torch was loaded first, so only the count applies" if self.late else ""
        return f"{self.threads} torch threads ({self.source}) of {self.cpus} usable CPUs; {env}{late}"


choice: Choice | None = None  # what the package's import chose (patchnet/__init__.py)


def affinity_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct cores among ``cpus`` (hyperthread siblings counted once); ``len(cpus)`` where sysfs says nothing."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(
                ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
            )
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def cgroup_cpus(root: Path = CGROUP, own: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs a cgroup quota allows this process (the smallest along its cgroup's path), None without one."""
    limits = [limit for d in _cgroup_dirs(root, own) if (limit := read_quota(d)) is not None]
    return min(limits) if limits else None


def _cgroup_dirs(root: Path, own: Path) -> list[Path]:
    """This process's cgroup folders (v2 and v1 ``cpu``) and their parents up to the mount; the mounts too."""
    paths = {"": "/", "cpu": "/"}
    try:
        for line in own.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            paths["cpu" if "cpu" in controllers.split(",") else controllers] = path
    except (OSError, ValueError):
        pass
    out = []
    for base, rel in ((root, paths[""]), (root / "cpu", paths["cpu"]), (root / "cpu,cpuacct", paths["cpu"])):
        d = base / rel.strip("/")
        out += [d, *[p for p in d.parents if base in p.parents], base]
    return list(dict.fromkeys(out))


def read_quota(d: Path) -> float | None:
    """A cgroup folder's CPU quota in CPUs: v2 ``cpu.max`` (``150000 100000``; ``max`` = none), v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none); None where it has none."""
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = (d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return q / p if q > 0 and p > 0 else None


def usable_cpus() -> int:
    """The logical CPUs this process may keep busy: its affinity, no more than a cgroup quota (rounded down)."""
    n, quota = len(affinity_cpus()), cgroup_cpus()
    return max(1, min(n, math.floor(quota)) if quota else n)


def automatic_threads() -> int:
    """torch's count on this machine's cores (one per physical core) within the CPUs this process may use."""
    return max(1, min(physical_cores(affinity_cpus()), usable_cpus()))


def loader_workers(workers: int, threads: int) -> int:
    """Decoding workers beside ``threads`` torch threads on a CPU device: at most the CPUs torch leaves free
    (decoders that take the trunk's cores stall its threads)."""
    return min(workers, max(0, usable_cpus() - threads))


def _env_count(environ, name: str) -> int | None:
    """A positive count from ``environ[name]`` (OMP_NUM_THREADS may list one per nesting level: the first)."""
    try:
        n = int(environ.get(name, "").split(",")[0])
    except ValueError:
        return None
    return n if n > 0 else None


def choose(environ=os.environ) -> tuple[int, str]:
    """The thread count and where it comes from: a user's OMP/MKL_NUM_THREADS, PATCHNET_THREADS, or automatic."""
    for name in COUNT_VARS:
        if (n := _env_count(environ, name)) is not None:
            return n, name
    if (n := _env_count(environ, "PATCHNET_THREADS")) is not None:
        return n, "PATCHNET_THREADS"
    return automatic_threads(), "auto"


def configure(environ=os.environ, modules=sys.modules) -> Choice:
    """Choose torch's thread count and wait policy before torch loads: set the variables the user has not set
    (``os.environ`` by default); where torch is loaded already, lower its count with ``torch.set_num_threads``."""
    global choice
    cpus, governor.enabled = usable_cpus(), False
    if environ.get("PATCHNET_THREADS", "").strip().lower() == "off":
        choice = Choice(cpus, _env_count(environ, "OMP_NUM_THREADS") or 0, "off")
        return choice
    threads, source = choose(environ)
    if "torch" in modules:  # too late for OpenMP's variables
        torch = modules["torch"]
        if source == "PATCHNET_THREADS" or (source == "auto" and torch.get_num_threads() > threads):
            torch.set_num_threads(threads)
        choice = Choice(cpus, torch.get_num_threads(), source, late=True)
        return choice
    env = {} if source in COUNT_VARS else {name: str(threads) for name in COUNT_VARS}
    waits = any(name in environ for name in WAIT_VARS)
    if not waits and busy(cpus):
        env.update(PASSIVE)
    environ.update(env)
    choice = Choice(cpus, threads, source, env)
    # only a count patchnet chose, of threads that spin, on CPUs whose use /proc/stat shows (no cgroup quota)
    spinning = source == "auto" and threads > 1 and not waits and "OMP_WAIT_POLICY" not in env
    governor.enabled = spinning and cgroup_cpus() is None  # tick turns it off where /proc/stat cannot tell
    return choice


BUSY_LOAD = 0.5  # the share of the usable CPUs others must use as a process starts for its threads to wait passively


def cpu_seconds(cpus: list[int], stat: Path = Path("/proc/stat")) -> float | None:
    """Seconds the CPUs ``cpus`` have spent busy since boot (user, nice, system, irq, softirq, steal), or None
    where /proc/stat cannot say."""
    want, total = {f"cpu{c}" for c in cpus}, 0
    try:
        for line in stat.read_text().splitlines():
            name, *fields = line.split()
            if name in want:  # user nice system idle iowait irq softirq steal ...
                v = [int(x) for x in fields[:8]]
                total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    except (OSError, ValueError, IndexError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def busy(cpus: int, glance: float = 0.05) -> bool:
    """Whether other work holds the machine as this process starts: other processes using at least half its
    usable CPUs over a ``glance`` (seconds) at its CPUs' counters in /proc/stat; where those do not tell
    (a cgroup quota shares the CPUs with the host's other work, not Linux), the 1-minute load average, which
    lags a minute behind. Passive waiting pays only then: beside a second job each runs 1.5x its time alone
    instead of 5-9x, but alone it costs extraction about 20% (decoding and extraction of VOC images, 192
    against 238 ms/image on a 2-core EPYC) and head steps about 10% (docs/performance.md)."""
    others = others_using(glance) if cgroup_cpus() is None else None
    if others is not None:
        return others >= BUSY_LOAD * cpus
    try:
        return os.getloadavg()[0] >= BUSY_LOAD * cpus
    except OSError:  # no load average (not a Unix): spinning, OpenMP's default
        return False


def others_using(glance: float) -> float | None:
    """The CPUs other processes keep busy, of this process's, over ``glance`` seconds; None where /proc/stat
    cannot tell."""
    mine = affinity_cpus()
    before, own = cpu_seconds(mine), own_seconds()
    if before is None or glance <= 0:
        return None
    time.sleep(glance)
    after = cpu_seconds(mine)
    return None if after is None else max(0.0, (after - before) - (own_seconds() - own)) / glance


def own_seconds() -> float:
    """CPU seconds this process has used, all its threads."""
    return sum(os.times()[:2])


def use_threads(threads: int) -> None:
    """A recipe's ``runtime.threads``: that many torch threads from now on; 0 keeps the count chosen at import."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- while the process runs

BUSY_OTHERS = 0.5  # CPUs other processes use, over a period, before spinning threads give way
IDLE_OTHERS = 0.25  # ... and below which the full count comes back


class Governor:
    """One torch thread while other processes keep this one's CPUs busy, the chosen count again once they stop.

    ``tick`` is cheap (a clock read) except once a ``period``, when it compares the busy time of this process's
    CPUs with its own CPU time: the difference is the other processes' share. Spinning threads count as this
    process's time, so a process alone reads about zero whatever its threads do."""

    def __init__(self, period: float = 2.0, clock=time.monotonic, own=own_seconds, cpus=None):
        self.enabled, self.period, self.clock, self.own = False, period, clock, own
        self.cpus = cpus
        self.last: tuple[float, float, float] | None = None  # (wall, CPUs' busy seconds, own seconds)
        self.full: int | None = None  # the count before giving way; None while it runs at full count
        self.others = 0.0  # the other processes' CPUs over the last period

    def tick(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self.last is not None and now - self.last[0] < self.period:
            return
        busy = cpu_seconds(self.cpus if self.cpus is not None else affinity_cpus())
        if busy is None:
            self.enabled = False
            return
        sample = (now, busy, self.own())
        previous, self.last = self.last, sample
        if previous is not None:
            self.decide(sample, previous)

    def decide(self, sample: tuple[float, float, float], previous: tuple[float, float, float]) -> None:
        """Set torch's count from the other processes' share between two (wall, busy, own seconds) samples."""
        import torch

        wall = sample[0] - previous[0]
        if wall <= 0:
            return
        self.others = max(0.0, (sample[1] - previous[1]) - (sample[2] - previous[2])) / wall
        if self.full is None and self.others >= BUSY_OTHERS and torch.get_num_threads() > 1:
            self.full = torch.get_num_threads()
            torch.set_num_threads(1)
        elif self.full is not None and self.others < IDLE_OTHERS:
            torch.set_num_threads(self.full)
            self.full = None


governor = Governor()


def tick() -> None:
    """Let the governor look at the machine (at most once a period); call it from the thread that runs torch."""
    governor.tick()
