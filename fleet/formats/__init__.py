"""The file formats: teachers (fleet-teacher/1, fleet-teacher-pack/1, the loader hook), events Parquet, heads rows <-> Arrow tables, the backbone's bytes. Imports fleet.core and fleet.compression."""
