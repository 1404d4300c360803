"""Domain errors of the fleet manager, grouped by where they come from.

Every message says what was wrong and what to do about it. The classes carry no HTTP status:
:mod:`fleet.app` maps them to one by walking the class hierarchy (a subclass of
:class:`NotFoundError` answers 404, and so on), so a new error only needs the right base class.
"""

from __future__ import annotations


class FleetError(ValueError):
    """Base class of every fleet-manager domain error."""


# --- generic kinds (the HTTP layer maps these) -------------------------------------------------


class InvalidInputError(FleetError):
    """A request or command argument is malformed (HTTP 422)."""


class NotFoundError(FleetError):
    """The named thing does not exist (HTTP 404)."""


class ConflictError(FleetError):
    """The request contradicts the current state (HTTP 409)."""


class PayloadTooLargeError(FleetError):
    """A request body or message is bigger than the configured limit (HTTP 413)."""


class UnavailableError(FleetError):
    """A component this request needs is not set up yet (HTTP 503)."""


# --- settings ---------------------------------------------------------------------------------


class ConfigError(FleetError):
    """The settings (config file, environment variables, flags) are missing or invalid."""


# --- storage ----------------------------------------------------------------------------------


class StorageError(FleetError):
    """The database cannot be opened or used."""


class MigrationError(StorageError):
    """The database schema cannot be migrated (e.g. it was written by a newer edgefleet)."""


# --- operators: API tokens and roles ----------------------------------------------------------


class AuthenticationError(FleetError):
    """No credentials, or credentials that are unknown, revoked or forged (HTTP 401)."""


class PermissionDeniedError(FleetError):
    """Valid credentials whose role is too low for the request (HTTP 403)."""


class DeviceAuthenticationError(AuthenticationError):
    """A device request signature is missing or refused (HTTP 401, device challenge)."""


class TokenNotFoundError(NotFoundError):
    """No operator token or enrollment token with that id."""


class LastAdminError(ConflictError):
    """Revoking this token would leave no active admin token."""


# --- enrollment -------------------------------------------------------------------------------


class EnrollmentRefusedError(AuthenticationError):
    """The enrollment token is unknown, revoked, expired or used up (HTTP 401)."""


class InvalidPublicKeyError(InvalidInputError):
    """A device public key is not an Ed25519 key in raw hex or PEM form."""


class TrustRootUnavailableError(UnavailableError):
    """There is no TUF root yet to hand to devices (run ``fleet keys init``)."""


# --- devices ----------------------------------------------------------------------------------


class DeviceNotFoundError(NotFoundError):
    """No device with that id."""


class DeviceDecommissionedError(ConflictError):
    """The device is decommissioned; its record is read-only and its credentials are void."""


class DuplicateDeviceKeyError(ConflictError):
    """An active device already uses this public key."""


# --- the broker's credentials and TLS (fleet.broker_auth, fleet.tls) ---------------------------


class BrokerReloadError(UnavailableError):
    """The broker could not be told to re-read its password and ACL files."""


class TlsError(FleetError):
    """A TLS CA, certificate, key or certificate request cannot be used or created."""


# --- signing keys and the TUF repository (fleet.keys, fleet.tuf_repo) -------------------------


class SigningKeyError(FleetError):
    """A signing key file cannot be used: unreadable, not an Ed25519 PEM key, or exposed."""


class SigningKeyMissingError(SigningKeyError, NotFoundError):
    """A signing key file does not exist; the message names the command that creates it."""


class SigningKeyExistsError(SigningKeyError, ConflictError):
    """``fleet keys init`` would overwrite existing keys (pass ``--force`` to replace them)."""


class TufRepositoryError(FleetError):
    """The TUF repository cannot do what was asked (wrong key, bad role, broken metadata)."""


class TufRepositoryNotInitializedError(TufRepositoryError, UnavailableError):
    """There is no TUF repository in that directory yet (run ``fleet keys init``)."""


class TargetConflictError(TufRepositoryError, ConflictError):
    """A target path is already published with other content; releases are immutable."""


# --- model registry and releases (fleet.bundle_upload, fleet.registry) ------------------------


class BundleArchiveError(FleetError):
    """An uploaded bundle archive is unreadable or unsafe (a path outside the bundle, a link, a
    device file, a duplicate name): HTTP 400."""


class BundleTooLargeError(PayloadTooLargeError):
    """An uploaded bundle is over the size limits, compressed or unpacked (HTTP 413)."""


class BundleRejectedError(InvalidInputError):
    """The bundle unpacked but failed validation: hashes, golden replay, signature, reference
    profile (HTTP 422). ``problems`` lists every finding."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class ReleaseVersionError(ConflictError):
    """The model version is not greater than the latest release of that model (HTTP 409)."""


class ReleaseNotFoundError(NotFoundError):
    """No such model or release."""


class ReleaseSigningUnavailableError(UnavailableError):
    """The fleet has no online signing keys or TUF repository to publish with (HTTP 503)."""


class RepositoryFileNotFoundError(NotFoundError):
    """No such TUF metadata or target file is served (HTTP 404)."""
