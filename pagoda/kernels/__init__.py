"""Triton kernels. Each module imports triton itself, so importing this package stays cheap
and works where triton is absent (the CPU path never needs it)."""
