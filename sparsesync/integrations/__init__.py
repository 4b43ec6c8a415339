"""Integrations of sparsesync with inference engines and trainers.

Each integration lives in its own subpackage (``sparsesync.integrations.vllm``, ...). Importing this package, or a
subpackage's ``__init__``, never imports the engine itself: the engine-side code is loaded by the engine when it
creates the backend.
"""
