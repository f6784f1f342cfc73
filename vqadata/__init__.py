"""Question data: the procedural shapes dataset (`shapes.py`) and evaluation items from JSONL (`data.py`)."""
