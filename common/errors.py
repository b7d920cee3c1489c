"""Domain exceptions: each message names the rule, the offending value, the limit and the fix."""


class FedsovError(Exception):
    """Base class for every error fedsov raises on purpose."""


class ConfigError(FedsovError):
    """A configuration value is unknown, mistyped or impossible."""


class DataError(FedsovError):
    """A data file is unreadable, malformed or does not belong to this node."""


class ModelError(FedsovError):
    """A base model or adapter cannot be loaded or does not match the federation."""


class PrivacyError(FedsovError):
    """A differential-privacy setting is invalid (e.g. delta too large for the data)."""


class BudgetExhausted(PrivacyError):
    """A round would push the privacy ledger past its lifetime epsilon budget."""


class LedgerError(PrivacyError):
    """The privacy ledger on disk is unreadable or inconsistent; training must stop."""


class FederationError(FedsovError):
    """The federation could not run (no nodes, every client refused, run failed)."""


class PolicyViolation(FedsovError):
    """A request breaks a region's policy; the node refuses it and sends nothing else."""


class ResidencyViolation(PolicyViolation, DataError):
    """Data on a node is not allowed there by its region's residency rule."""


class RetentionError(FedsovError):
    """Something a retention rule says must go could not be deleted, or the rule could not be read."""
