"""The tamper-evident audit log: hash-chained records, Ed25519-signed checkpoints,
verification, export and prompt retention."""

from appliance.audit.chain import GENESIS_HASH, AuditRecord, Checkpoint, scrub_secrets
from appliance.audit.export import export_checkpoint, export_records, load_checkpoint
from appliance.audit.log import Actor, AuditLog, admin_body, cli_actor
from appliance.audit.retention import resolve_policy, retain
from appliance.audit.signing import Signer, load_or_create_signing_key, load_pinned_public_key
from appliance.audit.verify import VerifyReport, verify, verify_from
from appliance.errors import AuditError

__all__ = [
    "GENESIS_HASH",
    "Actor",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "Checkpoint",
    "Signer",
    "VerifyReport",
    "admin_body",
    "cli_actor",
    "export_checkpoint",
    "export_records",
    "load_checkpoint",
    "load_or_create_signing_key",
    "load_pinned_public_key",
    "resolve_policy",
    "retain",
    "scrub_secrets",
    "verify",
    "verify_from",
]
