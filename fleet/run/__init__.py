"""The compression run: the stages as plain functions (stages), the run's plan (plan) and the stages as Ray tasks
(pipeline, the only module that imports ray). Imports every package below it."""
