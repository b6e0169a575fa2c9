"""The device side: run a bundle or model file and measure latency, memory and energy.

Torch-free: this package imports neither torch nor the exporters at module level;
only the ExecuTorch backend needs torch, and it is loaded on demand.
"""
