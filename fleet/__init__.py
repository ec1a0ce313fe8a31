"""fleet: compress fleets of per-campaign recurrent models into one shared backbone + tiny heads."""

__version__ = "0.1.0"
