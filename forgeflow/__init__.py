"""ForgeFlow: realtime, fault-isolated, multi-plugin computer-vision pipelines on Prefect."""

__version__ = "0.1.0"
