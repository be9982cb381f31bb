"""Runs before any test module is imported: Triton kernels are decorated (and so interpreted or
compiled) when kernels.py is first imported, by whichever test module imports it first."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # CPU tests run the Triton kernels in the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # flat layout
