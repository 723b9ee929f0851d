"""Reward service throughput: requests/s and images/s of served rewards against in-process scoring, one run.

    python benchmarks/reward_service.py [--size 256] [--batch 8] [--requests 48] [--clients 3] [--threads 2]

For ``incompressibility`` and ``clipscore`` (on the tiny random-weight CLIP the tests use, which measures what the
service adds around a network, not a real tower), with one intra-op thread on both sides:

* in-process: the reward called on batches of ``--batch`` images (what a trainer does with it in its process);
* served, one client: the same batches sent one after another by one ``remote`` reward (HTTP, base64 npy, JSON);
* served, load: ``--clients`` processes x ``--threads`` threads send ``--requests`` small requests each (1 to 3
  images), which the service batches (``--max-batch``); against the same small requests scored one by one
  in-process. The service's mean batch is read from ``/v1/health``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side, pixels")
    ap.add_argument("--batch", type=int, default=8, help="images per request (in-process / one client)")
    ap.add_argument("--batches", type=int, default=12, help="requests of --batch images (in-process / one client)")
    ap.add_argument("--requests", type=int, default=48, help="small requests per client process (load)")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()

    import torch

    from rlbench.benchmarks.timing import best_of
    from rlbench.registry import make_reward
    from rlbench.service.client import ServiceClient
    from rlbench.service.process import ServiceProcess, cpu_env, request_images, run_load
    from rlbench.testing import tiny_reward_options

    torch.set_num_threads(1)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    options = {"clipscore": tiny_reward_options("clipscore")}
    rewards = ["incompressibility", "clipscore"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    prompts = ["a photo of a cat"] * args.batch
    print(f"images {args.size}x{args.size}; in-process/one client: {args.batches} requests of {args.batch} images; "
          f"load: {args.clients} processes x {args.threads} threads x {args.requests // args.threads} requests of "
          f"1-3 images; one intra-op thread; service --max-batch {args.max_batch}")
    print(f"{'reward':18s} {'mode':24s} {'req/s':>8s} {'img/s':>8s}  notes")
    served_args = ["--max-batch", str(args.max_batch)]
    with ServiceProcess(",".join(rewards), options, args=served_args, env=cpu_env()) as service:
        client = ServiceClient(service.url)
        for name in rewards:
            local = make_reward(name, **options.get(name, {}))
            served = make_reward("remote", url=service.url, reward=name)

            def rate(reward) -> float:
                return best_of(lambda: [reward(images, prompts) for _ in range(args.batches)], repeat=2)

            for mode, reward in (("in-process", local), ("served, one client", served)):
                s = rate(reward)
                print(f"{name:18s} {mode:24s} {args.batches / s:8.1f} {args.batches * args.batch / s:8.1f}")
            before = client.health()["stats"]
            load = run_load(service.url, name, processes=args.clients, threads=args.threads, requests=args.requests,
                            size=args.size)
            after = client.health()["stats"]
            batches = after["batches"] - before["batches"]
            n = len(load.records)
            print(f"{name:18s} {'served, load':24s} {n / load.seconds:8.1f} {load.images / load.seconds:8.1f}  "
                  f"mean server batch {load.images / batches:.1f} images ({n / batches:.1f} requests)")
            small = [torch.from_numpy(request_images(0, r["worker"], r["index"], r["n"], args.size))
                     .permute(0, 3, 1, 2).float() / 255 for r in load.records]
            t0 = time.perf_counter()
            for x in small:
                local(x, prompts[: len(x)])
            s = time.perf_counter() - t0
            print(f"{name:18s} {'in-process, one by one':24s} {n / s:8.1f} {load.images / s:8.1f}  "
                  "the load's requests, unbatched")


if __name__ == "__main__":
    main()
