"""`python -m engine.sim.fit --model DIR`: fits the sim cost model to the real engine here.

Runs the model engine (this repository's, on the CPU) on random prompts and times its steps
(`Engine.last_step.seconds`, the engine's own clock): prompts alone at several lengths, then
decode batches of several sizes and context lengths. A least-squares fit of

    seconds = step_s + prefill_token_s · prompt tokens + decode_seq_s · decoding requests
              + decode_context_token_s · their context tokens

(least squares of the relative error) gives the constants (a term that comes out negative is
dropped and the rest refitted), printed with the fit's relative error and as the worker flags
that set them. Each point is the fastest
of `--repeats` steps: other processes on a shared box only ever add time to a step (preempted
threads, a barrier waiting on one), so the minimum is the engine's own speed. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import numpy as np

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import build_engine
from engine.sampling import SamplingParams
from engine.sim.cost_model import SimCostModel

TERMS = ("sim_step_s", "sim_prefill_token_s", "sim_decode_seq_s", "sim_decode_context_token_s")


def _prompt(engine: Engine, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, engine.model_config.vocab_size - 1, n).tolist()


def prefill_points(engine: Engine, lengths: Sequence[int], repeats: int,
                   ) -> list[tuple[tuple[int, int, int], float]]:
    """((prompt tokens, 0, 0), fastest step seconds) per prompt length (fresh prompts)."""
    points = []
    for n in lengths:
        times = []
        for r in range(repeats + 1):  # the first one warms up
            engine.add_request(f"p{n}.{r}", _prompt(engine, n, 1000 * n + r),
                               SamplingParams(max_tokens=1))
            engine.step()
            assert engine.last_step is not None and engine.last_step.prefill_tokens == n
            times.append(engine.last_step.seconds)
        points.append(((n, 0, 0), min(times[1:])))
    return points


def decode_points(engine: Engine, batches: Sequence[int], contexts: Sequence[int],
                  repeats: int) -> list[tuple[tuple[int, int, int], float]]:
    """((0, batch, context tokens), fastest step seconds) per batch size and context."""
    points = []
    for context in contexts:
        for batch in batches:
            ids = [f"d{context}.{batch}.{i}" for i in range(batch)]
            for i, rid in enumerate(ids):
                engine.add_request(rid, _prompt(engine, context, 7 * i + context),
                                   SamplingParams(max_tokens=repeats + 3, ignore_eos=True))
            while True:  # prefill them all, until a step decodes the whole batch
                engine.step()
                if engine.last_step is not None and engine.last_step.decode_seqs == batch:
                    break
            times = []
            for _ in range(repeats):
                total = sum(r.num_tokens for r in engine.scheduler.running)
                engine.step()
                assert engine.last_step is not None and engine.last_step.decode_seqs == batch
                times.append((total, engine.last_step.seconds))
            while engine.has_unfinished():
                engine.step()
            points.append(((0, batch, int(statistics.median(t for t, _ in times))),
                           min(s for _, s in times)))
    return points


def fit(points: Sequence[tuple[tuple[int, int, int], float]]) -> tuple[SimCostModel, float]:
    """The constants minimizing the squared relative error (no negative term), and the fit's
    mean relative error."""
    x = np.array([[1.0, *map(float, p)] for p, _ in points])  # [P, 4]
    y = np.array([s for _, s in points])  # [P]
    # relative errors, not seconds: the longest steps would otherwise decide every constant
    xw, yw = x / y[:, None], np.ones_like(y)  # [P, 4], [P]
    keep = list(range(len(TERMS)))
    while True:
        coef, *_ = np.linalg.lstsq(xw[:, keep], yw, rcond=None)
        if (coef >= 0).all():
            break
        keep.pop(int(np.argmin(coef)))  # a negative cost is noise: drop that term
    values = dict.fromkeys(TERMS, 0.0)
    values.update({TERMS[k]: float(c) for k, c in zip(keep, coef, strict=True)})
    model = SimCostModel(**values)
    predicted = np.array([model.step_seconds(*p) for p, _ in points])
    return model, float(np.mean(np.abs(predicted - y) / y))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.sim.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (real weights)")
    parser.add_argument("--dtype", help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--num-threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    engine = build_engine(args.model, EngineConfig(
        dtype=args.dtype, num_threads=args.num_threads, num_blocks=2048,
        max_num_batched_tokens=max(max(args.lengths), max(args.batches) * max(args.contexts))))
    points = prefill_points(engine, args.lengths, args.repeats)
    points += decode_points(engine, args.batches, args.contexts, args.repeats)
    model, error = fit(points)
    print("points (prompt tokens, decoding requests, context tokens) -> measured / modelled ms")
    for p, seconds in points:
        print(f"  {p!s:>18}  {seconds * 1e3:8.2f} / {model.step_seconds(*p) * 1e3:8.2f}")
    print(f"mean relative error {error:.1%}")
    for term in TERMS:
        print(f"  {term} = {getattr(model, term):.3g}")
    print("flags: " + " ".join(f"--{t.replace('_', '-')} {getattr(model, t):.3g}"
                               for t in TERMS))


if __name__ == "__main__":
    main()
