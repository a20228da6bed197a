"""Tooling around the runtime package: `labelstore bench` and `labelstore demo`, fidelity metrics, synthetic
teacher logits and the embedded demo teacher. Nothing in the store, teacher or student stages imports these."""
