"""A vLLM stand-in: its OpenAI API over the simulator instance model, in (scaled) real time."""
