"""Synthetic ad-tech fleets (events + trained teachers, `fleet synth`) and the zoo's generators and teacher classes. Imports the packages below it: core, compression, formats."""
