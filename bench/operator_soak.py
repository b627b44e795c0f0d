"""Operator soak: create and delete jobs many times over and watch the operator's memory.

Run: `make bench-soak` (python bench/operator_soak.py --cycles 3000 --write bench/results/operator-soak.json)

One local control plane with fake 8-GPU nodes (the scale benchmark's, bench/operator_scale.py) and our
operator, freshly started, out of cluster. Each cycle creates a FineTuneJob of 2 x 8-GPU workers, waits
until the operator has created both pods, deletes the job, and waits until the garbage collector has
removed the pods; `--parallel` cycles run at once. Every SAMPLE_SECONDS the operator's resident memory
(VmRSS) is sampled with the number of cycles done. Recorded: the samples, the least-squares slope of RSS
against cycles after the warm-up, in MiB per 1,000 cycles, the RSS at start and after everything is
gone, the operator's CPU time, and that nothing is left (no job, no pod). A leak that keeps anything per job (a waker, a metric series, a cache entry) shows as a
slope; a flat one is near 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import threading
import time
from pathlib import Path

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi

from finetune_operator.adapters.informer import TOMBSTONE_SECONDS
from finetune_operator.api.models import GROUP, PLURAL, VERSION
from operator_scale import (
    CACHE,
    JOB_LABEL,
    bench_cluster,
    create,
    job_body,
    prepare_namespace,
    proc_cpu_seconds,
    proc_rss_mib,
    provenance,
    start_operator,
)

NAMESPACE = "soak"
SAMPLE_SECONDS = 1.0
#: Samples before this are the warm-up: the informers remember each deletion for TOMBSTONE_SECONDS (to
#: refuse a write-through that raced it), so memory rises until the first ones expire, then levels.
WARMUP_SECONDS = TOMBSTONE_SECONDS + 30
CYCLE_TIMEOUT_S = 120.0


def cycle(core: CoreV1Api, custom: CustomObjectsApi, index: int) -> None:
    """Create job-INDEX, wait for its two workers, delete it, and wait until the garbage collector has
    deleted its workers: kube-controller-manager deletes about 7 pods a second at its default client
    QPS, so cycles that did not wait would pile up pods it has not got to (and in the operator's pod
    store, which would then grow for a reason not its own)."""
    body = job_body("ours", NAMESPACE, index)
    name = body["metadata"]["name"]
    create(custom, body)
    selector = f"{JOB_LABEL['ours']}={name}"
    deadline = time.monotonic() + CYCLE_TIMEOUT_S
    while len(core.list_namespaced_pod(NAMESPACE, label_selector=selector).items) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no two workers after {CYCLE_TIMEOUT_S}s")
        time.sleep(0.1)
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    while core.list_namespaced_pod(NAMESPACE, label_selector=selector).items:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: workers still there {CYCLE_TIMEOUT_S}s after its creation")
        time.sleep(0.2)


def slope_per_1000(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MiB) against cycles done, per 1,000 cycles."""
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((x - mean_x) ** 2 for x, _ in samples)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in samples)
    return 1000 * cov / var if var else 0.0


def soak(api_client: ApiClient, cycles: int, parallel: int, logs: Path) -> dict[str, object]:
    core, custom = CoreV1Api(api_client), CustomObjectsApi(api_client)
    prepare_namespace(core, NAMESPACE, "ours")
    proc = start_operator("ours", logs / "soak.log", core)
    done, stop = [0], threading.Event()
    samples: list[tuple[float, int, float]] = []  # (seconds since the first cycle, cycles done, RSS MiB)

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            samples.append((time.monotonic() - started, done[0], proc_rss_mib(proc.pid, "VmRSS")))

    try:
        rss_start, cpu0, started = (
            proc_rss_mib(proc.pid, "VmRSS"),
            proc_cpu_seconds(proc.pid),
            time.monotonic(),
        )
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        lock = threading.Lock()

        def one(index: int) -> None:
            cycle(core, custom, index)
            with lock:
                done[0] += 1

        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, range(cycles)))
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        deadline = time.monotonic() + 300
        while True:
            jobs = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
            pods = core.list_namespaced_pod(NAMESPACE).items
            if not jobs["items"] and not pods:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"left after the soak: {len(jobs['items'])} jobs, {len(pods)} pods")
            time.sleep(1)
        time.sleep(5)  # the operator's last events
        steady = [(x, y) for t, x, y in samples if t >= WARMUP_SECONDS]
        if len(steady) < 10:
            raise RuntimeError(
                f"{len(steady)} samples after the warm-up: too few for a slope; run more cycles"
            )
        return {
            "cycles": cycles,
            "parallel": parallel,
            "seconds": round(elapsed, 1),
            "operator_cpu_s": round(proc_cpu_seconds(proc.pid) - cpu0, 1),
            "rss_start_mib": round(rss_start, 1),
            "rss_peak_mib": round(proc_rss_mib(proc.pid), 1),
            "rss_end_mib": round(proc_rss_mib(proc.pid, "VmRSS"), 1),
            "rss_slope_mib_per_1000_cycles": round(slope_per_1000(steady), 2),
            "left_jobs": len(jobs["items"]),
            "left_pods": len(pods),
            "warmup_seconds": WARMUP_SECONDS,
            "samples_seconds_cycles_rss_mib": [[round(t, 1), x, round(y, 1)] for t, x, y in samples],
        }
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=3000, help="create/delete cycles (default 3000)")
    parser.add_argument("--parallel", type=int, default=8, help="cycles at once (default 8)")
    parser.add_argument("--write", type=Path, help="write the result as JSON here")
    opts = parser.parse_args(argv)
    logs = CACHE / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with bench_cluster(2 * opts.parallel, kubeflow=False) as api_client:
        run = soak(api_client, opts.cycles, opts.parallel, logs)
    result = {
        "benchmark": "operator soak: create a 2 x 8-GPU job, wait for its workers, delete it, wait until they are gone; RSS per cycle",
        **provenance("bench/operator_soak.py", argv),
        **run,
    }
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("samples")}, indent=2))
    if opts.write:
        opts.write.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
