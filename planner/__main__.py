"""`python -m planner --router HOST:PORT` (also `tandem scale ...`): the planner process."""

from __future__ import annotations

import argparse
import asyncio

from cluster.kube_client import api_client
from observability.logging_setup import setup_logging
from planner.config import PlannerConfig, planner_flags
from planner.loop import Planner
from planner.read import RouterReader
from planner.scale import DeploymentScaler


async def serve(config: PlannerConfig) -> None:
    api = await api_client(config.kubeconfig)
    reader = RouterReader(config)
    try:
        await Planner(config, reader, DeploymentScaler(config, api)).run()
    finally:
        await reader.close()
        await api.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tandem scale", description="Sets the prefill and decode replica counts from the "
        "router's load figures, within bounds, with hysteresis (README: `tandem scale`).")
    flags = planner_flags()
    flags.add_to(parser)
    config = flags.parse(parser, argv)
    setup_logging()
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
