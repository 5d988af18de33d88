#!/usr/bin/env python
"""A job on a busy machine: extraction and head steps alone, beside a second patchnet process doing the same,
and beside a plain CPU-bound process, each as a ratio to its time alone, all in one run.

The jobs:
- extract: shared-mode patch features of --images devval images (decoded beforehand) with the recipe's
  extractor, after an untimed pass over the same images (oneDNN builds its kernels for each image size);
- head: the training step of the recipe's head (1280 -> 2048 -> 21 for the dev recipe; batch train.batch_size,
  SGD, train.precision) on fp16 rows drawn in a shuffled order from --rows rows in memory, as an epoch on
  cached features runs it; --steps steps (an epoch of the dev recipe is about 100).

Every job is a fresh process, started with its environment set explicitly: patchnet's thread variables
(OMP_NUM_THREADS, MKL_NUM_THREADS, OMP_WAIT_POLICY, KMP_BLOCKTIME, GOMP_SPINCOUNT, PATCHNET_THREADS) are
removed, then --policy decides: ``auto`` is what ``import patchnet`` chooses (patchnet/threads.py: one thread
per core this process may use; threads wait passively where other processes keep the CPUs busy as it starts,
and otherwise spin, with the governor running torch on one thread while others work); ``spin`` is the old
default (PATCHNET_THREADS=off: torch's count and OpenMP's wait policy unset, so threads spin a while before they
sleep); ``passive`` sets OMP_WAIT_POLICY=PASSIVE whatever the machine; ``threads=N`` sets PATCHNET_THREADS=N;
``spincount=N`` GOMP_SPINCOUNT=N. Neighbours:
- alone: nothing else runs;
- patchnet: a second process doing the same job with the same policy (or --side-policy), started first
  (past its warm-up) and looping until the measured job ends;
- cpu: a plain CPU-bound process, numpy matrix products on --hog-threads threads (default: the CPUs this
  process may use), started first;
- later: the measured job starts alone and keeps working past its warm-up while the second patchnet process
  starts (so that one finds the machine busy, as beside a running job), and the timing begins once that one
  is past its warm-up: the case of a job that was alone when it chose;
- together: as later, but the measured job pauses while the second one starts, so that both find the
  machine idle and their threads spin until each one's governor gives way: two jobs started at once.
The machine's speed drifts, so each of --rounds rounds runs every cell, in an order that rotates from
round to round, and a cell's time is the sum of its rounds. Do not run it beside other work.

    python benchmarks/busy.py --policy auto spin --images 30 --steps 300 --rounds 2  # windows of several 2 s periods
    python benchmarks/busy.py --policy auto --jobs head --steps 5 --rows 2048 --rounds 1   # a smoke test
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import patchnet  # before torch: patchnet.threads sets the thread count and wait policy of a job

HERE = Path(__file__).resolve()
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")
CLEARED += ("GOMP_SPINCOUNT", "PATCHNET_THREADS")
NEIGHBOURS = ("alone", "patchnet", "cpu", "later", "together")
UNIT = {"extract": "image", "head": "step"}
HOG = """
import numpy as np
a = np.random.default_rng(0).standard_normal((1024, 1024))
b = np.empty_like(a)
print("BUSY ready", flush=True)
while True:
    np.matmul(a, a, out=b)
"""


def env_of(policy: str, hog_threads: int = 0) -> dict[str, str]:
    """The environment of a child: this one's without the thread variables, then the policy's (or the hog's)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    if hog_threads:
        env.update({name: str(hog_threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")})
    elif policy == "spin":
        env["PATCHNET_THREADS"] = "off"
    elif policy == "passive":  # as import patchnet chooses on a busy machine, whatever the load
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("threads="):  # that many torch threads; the wait policy as import patchnet chooses it
        env["PATCHNET_THREADS"] = policy.split("=", 1)[1]
    elif policy.startswith("spincount="):  # GNU OpenMP spins this many times, then sleeps; the count stays auto
        env["GOMP_SPINCOUNT"] = policy.split("=", 1)[1]
    return env


# --------------------------------------------------------------------------- the jobs (in a child process)


def extract_job(args):
    """(one image's extraction, warm-up units): the recipe's extractor on decoded devval images."""
    from patchnet.data import load_image, read_voc
    from patchnet.features.extract import build_extractor
    from patchnet.recipe import VOC_CLASSES

    from common import dev_recipe, require_voc

    recipe = dev_recipe(args)
    records = read_voc(require_voc(args.voc), "devval", VOC_CLASSES).records[: args.images]
    images = [load_image(r.path) for r in records]
    extractor = build_extractor(recipe)
    return (lambda i: extractor(images[i % len(images)])), len(images)


def head_job(args):
    """(one training step of the head, warm-up units) on fp16 rows in memory, as an epoch on the cache runs."""
    from dataclasses import asdict

    import numpy as np
    import torch

    from patchnet.backbones import backbone_spec
    from patchnet.head.layers import AdaptationHead
    from patchnet.head.losses import patch_loss
    from patchnet.training.state import make_optimizer
    from patchnet.training.trainer import autocast_dtype

    from common import dev_recipe

    recipe = dev_recipe(args)
    dim, classes, batch = (
        backbone_spec(recipe.backbone.name).feature_dim,
        len(recipe.data.classes),
        recipe.train.batch_size,
    )
    torch.manual_seed(0)
    head = AdaptationHead(dim, classes, **asdict(recipe.head))
    optimizer = make_optimizer(head, recipe)
    dtype = autocast_dtype(recipe.train.precision, torch.device("cpu"))
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.rows, dim), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, classes + 1, args.rows)
    order = rng.permutation(args.rows)

    def step(i: int) -> None:
        patchnet.threads.tick()  # as the trainer's loop does
        start = (i * batch) % max(1, args.rows - batch)
        idx = order[start : start + batch]
        x = torch.from_numpy(rows[idx])
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = head(x, members=True).float()
        loss = sum(patch_loss(z, labels[idx]) for z in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, 10


def child(args) -> None:
    """Warm up, say ``ready``, then loop forever (a neighbour) or time the job and say ``done``."""
    import torch

    unit, warm = {"extract": extract_job, "head": head_job}[args.child](args)
    for i in range(warm):
        unit(i)
    print("BUSY ready", flush=True)
    i = warm
    if args.wait == "pause":  # the parent starts a neighbour first, then says go
        sys.stdin.readline()
    elif args.wait == "work":  # ... and meanwhile the job works on, as a run would
        import threading

        go = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.readline(), go.set()), daemon=True).start()
        while not go.is_set():
            unit(i)
            i += 1
    n = args.images if args.child == "extract" else args.steps
    while args.loop:
        unit(i)
        i += 1
    start = time.perf_counter()
    for i in range(n):
        unit(i)
    seconds = time.perf_counter() - start
    done = {"seconds": seconds, "units": n, "threads": torch.get_num_threads(), "choice": str(patchnet.threads.choice)}
    print("BUSY done " + json.dumps(done), flush=True)


# --------------------------------------------------------------------------- the cells (in the parent)


def wait_for(proc: subprocess.Popen, tag: str) -> str:
    """The rest of the child's next ``BUSY <tag>`` line; an error if it ends first."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(f"BUSY {tag}"):
            return line[len(f"BUSY {tag}") :].strip()
    raise SystemExit(f"a child ended (exit status {proc.wait()}) before it said {tag!r}: {proc.args}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def job_command(job: str, args, loop: bool = False, wait: str = "") -> list[str]:
    cmd = [sys.executable, str(HERE), "--child", job, "--voc", args.voc, "--recipe", args.recipe]
    cmd += ["--images", str(args.images), "--steps", str(args.steps), "--rows", str(args.rows)]
    return cmd + (["--loop"] if loop else []) + (["--wait", wait] if wait else []) + ["--set", *args.set]


def cell(job: str, policy: str, neighbour: str, args) -> dict:
    """One measured job beside its neighbour: the child's ``done`` record."""
    start = lambda cmd, env, **kw: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, **kw)
    side = None
    try:
        if neighbour in ("later", "together"):  # the measured job first, alone as it starts; then a second one
            wait = "work" if neighbour == "later" else "pause"
            timed = start(job_command(job, args, wait=wait), env_of(policy), stdin=subprocess.PIPE)
            try:
                wait_for(timed, "ready")
                side = start(job_command(job, args, loop=True), env_of(args.side_policy or policy))
                wait_for(side, "ready")
                timed.stdin.write("go\n")
                timed.stdin.flush()
                return json.loads(wait_for(timed, "done"))
            finally:
                stop(timed)
        if neighbour == "patchnet":
            side = start(job_command(job, args, loop=True), env_of(args.side_policy or policy))
        elif neighbour == "cpu":
            side = start([sys.executable, "-c", HOG], env_of(policy, args.hog_threads))
        if side is not None:
            wait_for(side, "ready")
        timed = start(job_command(job, args), env_of(policy))
        try:
            done = json.loads(wait_for(timed, "done"))
        finally:
            stop(timed)
    finally:
        if side is not None:
            stop(side)
    return done


def main() -> None:
    from patchnet.threads import usable_cpus

    from common import bench_parser, cpu_name, table

    ap = bench_parser(__doc__)
    ap.add_argument(
        "--policy",
        nargs="+",
        default=["auto", "spin"],
        help="auto, spin, passive, threads=N (PATCHNET_THREADS=N), spincount=N (GOMP_SPINCOUNT=N)",
    )
    ap.add_argument("--side-policy", help="the patchnet neighbour's policy (default: the measured job's)")
    ap.add_argument("--jobs", nargs="+", default=["extract", "head"], choices=["extract", "head"])
    ap.add_argument("--images", type=int, default=10, help="extract: devval images timed (and warmed up on)")
    ap.add_argument("--steps", type=int, default=100, help="head: training steps timed")
    ap.add_argument("--rows", type=int, default=16384, help="head: feature rows in memory the batches come from")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hog-threads", type=int, default=usable_cpus(), help="cpu: the numpy process's threads")
    ap.add_argument("--child", choices=["extract", "head"], help="(internal) run one job in this process")
    ap.add_argument("--loop", action="store_true", help="(internal) the job loops until it is stopped")
    ap.add_argument(
        "--wait", choices=["pause", "work"], help="(internal) wait for a line on stdin to start, idle or working"
    )
    args = ap.parse_args()
    if args.child:
        return child(args)
    cells = [(j, p, n) for j in args.jobs for p in args.policy for n in NEIGHBOURS]
    seconds, units, choices = dict.fromkeys(cells, 0.0), dict.fromkeys(cells, 0), {}
    for r in range(args.rounds):
        for c in cells[r % len(cells) :] + cells[: r % len(cells)]:
            done = cell(*c, args)
            seconds[c] += done["seconds"]
            units[c] += done["units"]
            choices[c[1]] = done["choice"]
            print(
                f"round {r + 1}/{args.rounds}: {' '.join(c)}: {done['seconds'] / done['units']:.4f} s "
                f"({done['choice']}; {done['threads']} threads at the end)",
                file=sys.stderr,
            )
    per = {c: seconds[c] / units[c] for c in cells}
    print(f"\npython benchmarks/busy.py {' '.join(sys.argv[1:])}")
    print(f"{cpu_name()}, {usable_cpus()} usable CPUs; {args.recipe} {' '.join(args.set)}")
    for policy, chosen in choices.items():
        print(f"- {policy}: {chosen}")
    print(
        f"- cpu neighbour: numpy 1024 x 1024 matrix products on {args.hog_threads} threads; {args.rounds} round(s), "
        f"extract {args.images} images, head {args.steps} steps of a round\n"
    )
    rows = []
    for job, policy, neighbour in cells:
        t = per[(job, policy, neighbour)]
        spin = per.get((job, "spin", neighbour)) if "spin" in args.policy else None
        rows.append(
            (
                job,
                policy,
                neighbour,
                f"{1000 * t:.1f} ms/{UNIT[job]}",
                f"{t / per[(job, policy, 'alone')]:.2f}",
                f"{t / spin:.2f}" if spin else "",
            )
        )
    print(table(rows, ("job", "policy", "beside", "time", "x alone", "x spin same neighbour")))


if __name__ == "__main__":
    main()
