"""edgeops_core: the contract between the host toolchain, the device agent and the console.

Bundle format and verification, the manifest schema, the target profile schema and the error
tree live here. This package runs on devices: it needs only the standard library,
numpy and ``cryptography``, and never imports torch, tensorflow, onnx or model_signing.
"""

from edgeops_core.bundle import (
    MANIFEST_MEMBER,
    MAX_BUNDLE_BYTES,
    MODEL_MEMBERS,
    VerifiedBundle,
    pack_bundle,
    read_members,
    verify_bundle,
    verify_members,
    write_atomically,
)
from edgeops_core.errors import (
    BundleError,
    BundleFormatError,
    DigestMismatchError,
    EdgeopsError,
    ExpiredBundleError,
    InputError,
    KeyFileError,
    ManifestError,
    ProfileError,
    SignatureError,
    UnknownTargetError,
)
from edgeops_core.fields import FieldReader, load_toml
from edgeops_core.manifest import (
    SCHEMA_VERSION,
    DriftReference,
    FeatureReference,
    Lineage,
    Manifest,
    Preprocessing,
    QuantParams,
    SelfTest,
    SelfTestVector,
    TensorSpec,
    format_time,
    parse_time,
)
from edgeops_core.preprocess import apply_preprocessing
from edgeops_core.profile import FORMATS_BY_RUNTIME, Budgets, TargetProfile, find_profile, list_profiles, load_profile
from edgeops_core.signature import SIGNATURE_MEMBER, TrustedKey, load_public_key, verify_signature

__version__ = "0.1.0"

__all__ = [
    "FORMATS_BY_RUNTIME",
    "MANIFEST_MEMBER",
    "MAX_BUNDLE_BYTES",
    "MODEL_MEMBERS",
    "SCHEMA_VERSION",
    "SIGNATURE_MEMBER",
    "Budgets",
    "BundleError",
    "BundleFormatError",
    "DigestMismatchError",
    "DriftReference",
    "EdgeopsError",
    "ExpiredBundleError",
    "FeatureReference",
    "FieldReader",
    "InputError",
    "KeyFileError",
    "Lineage",
    "Manifest",
    "ManifestError",
    "Preprocessing",
    "ProfileError",
    "QuantParams",
    "SelfTest",
    "SelfTestVector",
    "SignatureError",
    "TargetProfile",
    "TensorSpec",
    "TrustedKey",
    "UnknownTargetError",
    "VerifiedBundle",
    "__version__",
    "apply_preprocessing",
    "find_profile",
    "format_time",
    "list_profiles",
    "load_profile",
    "load_public_key",
    "load_toml",
    "pack_bundle",
    "parse_time",
    "read_members",
    "verify_bundle",
    "verify_members",
    "verify_signature",
    "write_atomically",
]
