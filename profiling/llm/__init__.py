"""Running exported decoder LLMs on the device: one :class:`LLMRuntime` per format, torch-free where the format is."""
