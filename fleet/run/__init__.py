"""The compression run: the stages as plain functions (stages) and as Ray tasks (pipeline, the only module that imports ray). Imports every package below it."""
