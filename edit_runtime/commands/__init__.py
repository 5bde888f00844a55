"""Sub-commands of ``edit-runtime`` that live in their own modules (each exposes ``register``)."""
