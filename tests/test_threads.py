"""patchnet.threads: the thread count and wait policy chosen before torch loads, and what overrides them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchnet import threads
from patchnet.features import extract
from patchnet.recipe import RecipeError

from conftest import tiny_recipe

OTHERS_USING = threads.others_using
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


@pytest.fixture(autouse=True)
def no_governor_after():
    """configure() may enable the governor; the rest of the suite runs without it (conftest.py)."""
    yield
    threads.governor.enabled = False


def machine(monkeypatch, cpus: int, cores: int, quota: float | None) -> None:
    """A machine where this process may use ``cpus`` logical CPUs on ``cores`` cores, under ``quota``."""
    monkeypatch.setattr(threads, "affinity_cpus", lambda: list(range(cpus)))
    monkeypatch.setattr(threads, "physical_cores", lambda found: cores)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: quota)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0 * cpus, 0.0, 0.0))  # a busy machine: threads wait passively
    monkeypatch.setattr(threads, "others_using", lambda glance: None)  # as where /proc/stat cannot tell


def test_threads_spin_on_an_idle_machine_and_wait_passively_on_a_busy_one(monkeypatch):
    machine(monkeypatch, 4, 4, None)
    for load, passive in ((0.3, False), (1.9, False), (2.0, True), (6.0, True)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        environ: dict[str, str] = {}
        threads.configure(environ, modules={})
        assert ("OMP_WAIT_POLICY" in environ) == passive and environ["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize(
    ("cpus", "cores", "quota", "usable", "count", "workers"),
    [
        (2, 2, None, 2, 2, 0),  # this 2-core machine: torch takes both, the loader decodes in the main process
        (16, 8, None, 16, 8, 2),  # hyperthreads: one thread per core, the siblings decode
        (16, 8, 2.5, 2, 2, 0),  # a container's --cpus 2.5 on that machine: two threads, no spare CPU
        (16, 8, 4.0, 4, 4, 0),
        (16, 8, 0.5, 1, 1, 0),  # half a CPU: still one thread
        (3, 3, None, 3, 3, 0),  # taskset -c 0-2
    ],
)
def test_the_count_follows_the_affinity_the_cores_and_the_quota(
    monkeypatch, cpus, cores, quota, usable, count, workers
):
    machine(monkeypatch, cpus, cores, quota)
    assert threads.usable_cpus() == usable
    assert threads.automatic_threads() == count
    assert threads.loader_workers(2, count) == workers
    assert threads.loader_workers(2, 1) == min(2, usable - 1)


def test_cgroup_quotas_v2_and_v1_are_read_along_the_process_path(tmp_path):
    own = tmp_path / "cgroup"
    root = tmp_path / "fs"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")  # no limit here: the parent's counts
    (root / "a" / "cpu.max").write_text("150000 100000\n")
    own.write_text("0::/a/b\n")
    assert threads.cgroup_cpus(root, own) == 1.5
    (root / "cpu.max").write_text("300000 100000\n")
    assert threads.cgroup_cpus(root, own) == 1.5  # the smallest along the path
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "x").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "x" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu,cpuacct" / "docker" / "x" / "cpu.cfs_period_us").write_text("100000\n")
    own.write_text("5:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n0::/\n")
    assert threads.cgroup_cpus(v1, own) == 2.0
    (v1 / "cpu,cpuacct" / "docker" / "x" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpus(v1, own) is None
    assert threads.cgroup_cpus(tmp_path / "nothing", tmp_path / "missing") is None


def test_hyperthread_siblings_count_once(tmp_path):
    for cpu, core in [(0, 0), (1, 1), (2, 0), (3, 1)]:
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "core_id").write_text(f"{core}\n")
        (topology / "physical_package_id").write_text("0\n")
    assert threads.physical_cores([0, 1, 2, 3], tmp_path) == 2
    assert threads.physical_cores([0, 2], tmp_path) == 1
    assert threads.physical_cores([0, 7], tmp_path) == 2  # unreadable: every CPU counts


def test_before_torch_the_count_and_a_passive_wait_are_set(monkeypatch):
    machine(monkeypatch, 16, 8, 3.0)
    environ: dict[str, str] = {}
    choice = threads.configure(environ, modules={})
    assert environ == {
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        "OMP_WAIT_POLICY": "PASSIVE",
        "KMP_BLOCKTIME": "0",
    }
    assert (choice.cpus, choice.threads, choice.source, choice.late) == (3, 3, "auto", False)
    assert "3 torch threads" in str(choice)


PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


@pytest.mark.parametrize(
    ("user", "count", "source", "added"),
    [
        ({"OMP_NUM_THREADS": "1"}, 1, "OMP_NUM_THREADS", PASSIVE),
        ({"OMP_NUM_THREADS": "4,2"}, 4, "OMP_NUM_THREADS", PASSIVE),  # one count per nesting level: the first
        ({"MKL_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}, 3, "MKL_NUM_THREADS", PASSIVE),  # torch's order
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, "auto", {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}),
        ({"KMP_BLOCKTIME": "200"}, 2, "auto", {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}),
        ({"GOMP_SPINCOUNT": "1000"}, 2, "auto", {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}),
        ({"PATCHNET_THREADS": "5"}, 5, "PATCHNET_THREADS", {"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5", **PASSIVE}),
        ({"PATCHNET_THREADS": "off"}, 0, "off", {}),
        ({"PATCHNET_THREADS": "off", "OMP_NUM_THREADS": "1"}, 1, "off", {}),
    ],
)
def test_the_variables_users_set_win(monkeypatch, user, count, source, added):
    machine(monkeypatch, 2, 2, None)
    environ = dict(user)
    choice = threads.configure(environ, modules={})
    assert (choice.threads, choice.source) == (count, source)
    assert environ == {**user, **added}  # what the user set is never overwritten


class FakeTorch:
    def __init__(self, n: int):
        self.n, self.calls = n, []

    def get_num_threads(self) -> int:
        return self.n

    def set_num_threads(self, n: int) -> None:
        self.calls.append(n)
        self.n = n


@pytest.mark.parametrize(
    ("loaded", "user", "calls", "after"),
    [
        (8, {}, [2], 2),  # torch counted the host's cores, not the quota: lowered
        (1, {}, [], 1),  # the user lowered it already: kept
        (8, {"PATCHNET_THREADS": "3"}, [3], 3),
        (8, {"OMP_NUM_THREADS": "8"}, [], 8),
    ],
)
def test_after_torch_only_the_count_changes(monkeypatch, loaded, user, calls, after):
    machine(monkeypatch, 16, 8, 2.0)
    fake, environ = FakeTorch(loaded), dict(user)
    choice = threads.configure(environ, modules={"torch": fake})
    assert (fake.calls, choice.threads, choice.late) == (calls, after, True)
    assert environ == user  # too late for OpenMP's variables: none set


def test_runtime_threads_sets_the_count_of_a_run(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(extract, "use_threads", seen.append)
    extract.build_extractor(tiny_recipe(tmp_path, tmp_path, "runtime.threads=1"))
    extract.build_extractor(tiny_recipe(tmp_path, tmp_path))
    assert seen == [1, 0]
    before = torch.get_num_threads()
    try:
        threads.use_threads(1)
        assert torch.get_num_threads() == 1
        threads.use_threads(0)  # 0: the count chosen at import stays
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RecipeError, match="runtime.threads"):
        tiny_recipe(tmp_path, tmp_path, "runtime.threads=-1")


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in (*THREAD_VARS, "PATCHNET_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, cwd=Path(__file__).parent
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.slow  # subprocesses
def test_importing_patchnet_loads_no_torch_and_sets_the_variables_before_it():
    code = (
        "import os, sys, patchnet\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import torch\n"
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), os.environ['OMP_NUM_THREADS'], torch.get_num_threads(),"
        " patchnet.threads.automatic_threads())"
    )
    policy, env_count, count, auto = _python(code).split()
    assert policy in ("PASSIVE", "unset") and int(env_count) == int(count) == int(auto)  # passive when busy
    assert _python(code, OMP_NUM_THREADS="1").split()[1:3] == ["1", "1"]  # the user's count wins


def test_cpu_seconds_read_the_busy_time_of_the_given_cpus(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(
        "cpu  300 0 100 5000 7 0 0 0 0 0\ncpu0 100 5 50 2000 3 1 2 4 0 0\ncpu1 200 0 50 3000 4 0 0 0 0 0\nintr 1 2\n"
    )
    tick = os.sysconf("SC_CLK_TCK")
    assert threads.cpu_seconds([0], stat) == pytest.approx((100 + 5 + 50 + 1 + 2 + 4) / tick)  # idle, iowait out
    assert threads.cpu_seconds([0, 1], stat) == pytest.approx((162 + 250) / tick)
    assert threads.cpu_seconds([0], tmp_path / "missing") is None


def counters(monkeypatch, busy_seconds: list[float], own: list[float]) -> None:
    """The CPUs' busy seconds and this process's seconds, read in turn."""
    monkeypatch.setattr(threads, "cpu_seconds", lambda cpus: busy_seconds.pop(0))
    monkeypatch.setattr(threads, "own_seconds", lambda: own.pop(0))


@pytest.mark.parametrize(
    ("busy_seconds", "own", "expected"),
    [
        ([10.0, 10.08], [1.0, 1.0], True),  # others used 0.08 s of 2 CPUs' 0.1 s over the glance
        ([10.0, 10.08], [1.0, 1.07], False),  # this process's own work (a spinning import) is not others'
        ([10.0, 10.02], [1.0, 1.0], False),  # the odd shell command
    ],
)
def test_a_glance_at_the_counters_tells_a_busy_machine_as_the_process_starts(monkeypatch, busy_seconds, own, expected):
    machine(monkeypatch, 2, 2, None)
    monkeypatch.setattr(threads, "others_using", OTHERS_USING)
    counters(monkeypatch, busy_seconds, own)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the lagging load average says idle
    assert threads.busy(2, glance=0.05) is expected


def test_the_governor_gives_way_while_others_work_and_takes_the_cores_back_after(monkeypatch):
    count = [2]
    monkeypatch.setattr(torch, "get_num_threads", lambda: count[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: count.__setitem__(0, n))
    now = [0.0]
    # per period of 2 s: the CPUs' busy seconds and this process's; others = busy - own
    busy_seconds = [0.0, 4.0, 8.0, 11.0, 15.0, 19.0, 19.4]
    own = [0.0, 4.0, 6.0, 8.0, 10.0, 12.0, 12.2]  # alone (spinning: all its own), then beside 1-2 CPUs of others
    gov = threads.Governor(period=2.0, clock=lambda: now[0], own=lambda: own.pop(0), cpus=[0, 1])
    gov.enabled = True
    monkeypatch.setattr(threads, "cpu_seconds", lambda cpus: busy_seconds.pop(0))
    seen = []
    for t in (0.0, 0.5, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0):
        now[0] = t
        gov.tick()
        seen.append(count[0])
    # 0.5 s: within the period, nothing read; 4.0 s: others took 2 CPUs -> one thread; 10 s: others 1 CPU, still;
    # 12 s: others 0.1 CPU -> both threads again
    assert seen == [2, 2, 2, 1, 1, 1, 1, 2]
    assert gov.others == pytest.approx(0.1)


def test_the_governor_acts_only_on_spinning_threads_patchnet_counted(monkeypatch):
    machine(monkeypatch, 2, 2, None)
    monkeypatch.setattr(threads, "cpu_seconds", lambda cpus: 0.0)
    monkeypatch.setattr(threads, "others_using", lambda glance: 0.0)  # idle: threads spin
    for environ, enabled in (
        ({}, True),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, False),  # the user's policy
        ({"OMP_NUM_THREADS": "2"}, False),  # the user's count
        ({"PATCHNET_THREADS": "off"}, False),
    ):
        threads.configure(environ, modules={})
        assert threads.governor.enabled is enabled, environ
    monkeypatch.setattr(threads, "others_using", lambda glance: 2.0)  # busy: threads wait passively, no governor
    threads.configure({}, modules={})
    assert not threads.governor.enabled
